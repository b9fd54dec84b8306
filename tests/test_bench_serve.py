"""bench/serve.py: the serving benchmark's targets share one abstract interface."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import serve  # noqa: E402


def test_a_target_missing_a_method_cannot_be_made():
    """A new target that forgets processes() fails when it is built, naming the method, not mid-benchmark."""

    class Forgetful(serve.Target):
        def start(self) -> str:
            return "http://127.0.0.1:1/v1"

        def stop(self) -> None:
            pass

    with pytest.raises(TypeError, match="processes"):
        Forgetful()
    with pytest.raises(TypeError, match="start"):
        serve.Target()


def test_every_benchmarked_target_implements_the_interface(tmp_path):
    setup = serve.Setup(checkpoint=tmp_path, hf_dir=tmp_path, max_running=2, threads=1, work=tmp_path,
                        vllm_python=sys.executable)
    for name, make in serve.TARGETS.items():
        target = make(setup)  # TypeError if a target left an abstract method out
        assert isinstance(target, serve.Target) and target.name == name
