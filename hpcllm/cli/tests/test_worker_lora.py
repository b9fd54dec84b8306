"""`hpcllm worker --lora-module NAME=PATH`: malformed values and modes without adapters are refused before any load."""

import pytest
from click.testing import CliRunner

from hpcllm.cli.worker import worker


@pytest.mark.parametrize("args, message", [
    (["--lora-module", "no-equals-sign"], "is not NAME=PATH"),
    (["--lora-module", "x=/a", "--lora-module", "x=/b"], "'x' is given twice"),
    (["--lora-module", "x=/a", "--tensor-parallel"], "not supported with --tensor-parallel"),
])
def test_bad_lora_modules_are_refused_saying_what_to_fix(tmp_path, args, message):
    result = CliRunner().invoke(worker, ["--model", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
