"""Process helpers shared by the services (hpcllm/procs.py)."""

import subprocess
import sys
import textwrap


def test_freezing_the_startup_heap_leaves_full_collections_nothing_of_it_to_walk():
    """A service process with torch and transformers imported holds ~300k+ tracked objects; each full collection
    walked all of them with the GIL held (0.1-0.2 s of no thread running, tokens stalled). Frozen, a full
    collection walks only what was allocated since. Run in a fresh interpreter: freezing this one would keep the
    test session's cyclic garbage alive."""
    script = textwrap.dedent("""
        import gc
        import torch, transformers.modeling_utils
        from hpcllm.procs import freeze_startup_heap
        before = len(gc.get_objects())
        freeze_startup_heap()
        gc.collect()
        print(before, gc.get_freeze_count(), len(gc.get_objects()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    before, frozen, walked = out.stdout.split()
    assert int(before) > 100_000 and int(frozen) >= int(before) - 1_000
    # What a full collection still walks; its time is not asserted (a shared CI machine's clock is no test).
    assert int(walked) < 1_000
