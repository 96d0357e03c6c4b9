"""D keeps the real cause of a failed transfer when P cancels it afterwards.

P's connector cancels every push that failed (it learns ``checksum`` from D's finish reply); D's
connector counts its fallback by the reason ``KVReceiver.poll`` reports. That reason must stay the
cause (``checksum``), not become ``cancelled``, whichever of P's cancel and D's poll comes first.
"""

from __future__ import annotations

import time

from lmcache_disagg.transfer.receiver import KVReceiver
from lmcache_disagg.transfer.sender import KVSender
from lmcache_disagg.transfer.state import PushState, RecvState
from lmcache_disagg.vllm_server import free_port
from tests.transfer.faultproxy import ArmedFaultProxy
from tests.transfer.utils import FP, chunk_data, make_config


def test_cancel_after_a_checksum_failure_keeps_the_reason() -> None:
    data_port = free_port()
    relay = ArmedFaultProxy(data_port)
    rx = KVReceiver(make_config("tcp", data_port=data_port, advertised_data_port=relay.port), FP)
    rx.start()
    tx = KVSender(make_config("tcp", push_deadline=3.0), FP)
    tx.start()
    try:
        relay.arm("flip", skip=1)
        handle = tx.open(rx.endpoint, "flipped", 3)
        for index in range(3):
            page = tx.acquire_page(2.0)
            page.data.copy_(chunk_data(5, index, FP.page_bytes))
            handle.write(index, page, FP.page_bytes, FP.chunk_size, b"k%d" % index)
        handle.finish()
        status = handle.wait(6.0)
        assert (status.state, status.reason) == (PushState.FAILED, "checksum")
        handle.cancel()  # what P's connector does with every failed push
        deadline = time.monotonic() + 5
        while rx.occupancy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.occupancy() == 0  # the cancel freed the pages ...
        state = rx.poll("flipped")  # ... and D still knows why
        assert (state.state, state.reason) == (RecvState.FAILED, "checksum")
    finally:
        tx.shutdown()
        relay.close()
        rx.shutdown()
