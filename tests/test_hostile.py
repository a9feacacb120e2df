

def test_an_oversized_frame_is_refused_inside_zeromq_before_it_is_buffered():
    ctx = zmq.Context()
    loop = asyncio.new_event_loop()
    router = Transport(router=True, address="tcp://127.0.0.1:0", context=ctx)
    router.limit_frames(10_000)
    got = []
    socks = []
    try:
        router.attach(loop, lambda peer, frames: got.append(frames))
        for payload in ([b"x" * 50_000], [b"ok"]):  # the big one's connection is dropped by ZeroMQ
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(router.address)
            d.send_multipart(payload)
            socks.append(d)

        async def wait():
            for _ in range(200):
                if got:
                    await asyncio.sleep(0.05)
                    return
                await asyncio.sleep(0.01)

        loop.run_until_complete(wait())
        assert got == [[b"ok"]]
    finally:
        for d in socks:
            d.close(0)
        router.close(), loop.close(), ctx.term()
