"""EngineLoop's failure isolation, over a stand-in engine (control flow only: no model)."""

import types

from jaxlm.serve.sequence import Event
from jaxlm.serve.request import Output
from jaxlm.serve.server import EngineLoop


class StandIn:
    """Queues requests by id; ``step`` fails once while ``fail_step``, else finishes every running one."""

    def __init__(self):
        self.running, self.waiting, self.aborted, self.fail_step = [], [], [], True

    def add_request(self, request):
        if request == "bad":
            raise OverflowError("cannot pack")
        self.waiting.append(request)
        return request

    def has_work(self):
        return bool(self.running or self.waiting)

    def abort(self, rid):
        self.aborted.append(rid)
        self.running = [s for s in self.running if s.request_id != rid]

    def step(self):
        if not self.running:  # admit one request per step
            self.running.append(types.SimpleNamespace(request_id=self.waiting.pop(0)))
        if self.fail_step:
            self.fail_step = False
            raise RuntimeError("device lost")
        done, self.running = self.running, []
        return [Event(s.request_id, [1], Output(s.request_id, [0], [1], None, "length")) for s in done]


def test_a_bad_request_and_a_failed_step_fail_only_their_own_requests():
    engine = StandIn()
    loop = EngineLoop(engine)
    queues = {rid: loop.submit(rid) for rid in ("first", "bad", "second")}
    loop.start()
    try:
        got = {rid: q.get(timeout=10) for rid, q in queues.items()}
    finally:
        loop.stop()
    assert isinstance(got["bad"], OverflowError)  # its own queueing failure
    assert isinstance(got["first"], RuntimeError) and "device lost" in str(got["first"])  # it ran in the failed step
    assert got["second"].output.finish_reason == "length"  # it waited, then ran in a good step
    assert engine.aborted == ["first"]
    assert all(q.empty() for q in queues.values())  # one answer each, nothing after it
