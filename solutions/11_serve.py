# Solutions to chapter 11's exercises. Each block replaces the body of its stub cell.

# %% exercise 11.1
async def every(outputs: AsyncIterator[RequestOutput], k: int) -> AsyncIterator[RequestOutput]:
    """Yield every k-th output of a request, and always its finished one."""
    async with contextlib.aclosing(outputs):  # stopping early must still close (abort) the stream
        i = 0
        async for out in outputs:
            i += 1
            if i % k == 0 or out.finished:
                yield out


# %% exercise 11.2
class CappedEngine(AsyncEngine):
    """An AsyncEngine that lets at most `limit` requests into the engine at once."""

    def __init__(self, engine: LLMEngine, limit: int):
        AsyncEngine.__init__(self, engine)
        self.limit = limit
        self.slots = asyncio.Semaphore(limit)

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> RequestOutput:
        async with self.slots:  # wait at the door until one of the `limit` places is free
            return await AsyncEngine.generate(self, prompt, params)
