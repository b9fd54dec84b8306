"""`hpcllm convert` reads only files inside the source folder (issue 15): a symbolic link leaving it (to another
user's 0600 file, to /etc/shadow...) is refused, so its content never lands in a published checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from hpcllm.checkpoint.converter import convert
from hpcllm.checkpoint.errors import InvalidSource
from hpcllm.cli.main import main


@pytest.fixture
def source(hf_models, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(hf_models["llama"], copy)
    return copy


@pytest.mark.parametrize("where", ["tokenizer_config.json", "extra/notes.txt"])
def test_a_link_out_of_the_source_folder_is_refused(source, tmp_path, capsys, where):
    private = tmp_path / "someone-elses" / "secret.txt"
    private.parent.mkdir()
    private.write_text("not yours")
    private.chmod(0o600)
    link = source / where
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(private)
    with pytest.raises(InvalidSource) as exc:
        convert(source, tmp_path / "out", progress=False)
    assert f"{link} is a symbolic link to {private}, outside the source folder" in str(exc.value)
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(source), str(tmp_path / "out2"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "outside the source folder" in err and "Traceback" not in err


def test_links_inside_the_source_folder_are_fine(source, tmp_path):
    (source / "real").mkdir()
    shutil.move(source / "tokenizer_config.json", source / "real" / "tokenizer_config.json")
    (source / "tokenizer_config.json").symlink_to(source / "real" / "tokenizer_config.json")
    ckpt = convert(source, tmp_path / "out", progress=False)
    assert (ckpt.root / "tokenizer_config.json").read_text() == (source / "real" / "tokenizer_config.json").read_text()


def test_a_hugging_face_hub_cache_snapshot_converts(source, tmp_path):
    """The hub cache keeps files in models--ORG--NAME/blobs and links them from snapshots/REV: a user's usual
    local copy of a model. Links into the repository's blobs are fine; a link elsewhere is still refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        blob = blobs / f"blob{index}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    ckpt = convert(snapshot, tmp_path / "out", progress=False)
    assert (ckpt.root / "config.json").read_text() == (source / "config.json").read_text()

    private = tmp_path / "secret.txt"
    private.write_text("not yours")
    (snapshot / "notes.txt").symlink_to(private)
    with pytest.raises(InvalidSource, match="outside the source folder"):
        convert(snapshot, tmp_path / "out2", progress=False)


def test_a_hub_cache_repository_folder_names_its_snapshot(source, tmp_path):
    # models--ORG--NAME itself holds no weights (they are in snapshots/REV): say which folder to convert.
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(source, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with pytest.raises(InvalidSource, match="hub cache folder: convert one of its snapshots") as exc:
        convert(repo, tmp_path / "out", progress=False)
    assert str(repo / "snapshots" / "0123abcd") in str(exc.value)



@pytest.mark.parametrize("arch, linked", [("sharded", "model.safetensors.index.json"), (None, "manifest.json")])
def test_a_link_out_of_the_source_folder_is_refused_before_the_weights_are_looked_for(hf_models, tmp_path, arch,
                                                                                     linked):
    # Looking for the weights reads the index (and, in a folder without weights, a manifest.json): an outside
    # file's content showed in the error ("lists shard 'TOP-SECRET-VALUE', which is missing").
    source = tmp_path / "hf"
    if arch:
        shutil.copytree(hf_models[arch], source)
    else:
        source.mkdir()
    private = tmp_path / "someone-elses.json"
    private.write_text(json.dumps({"weight_map": {"w": "TOP-SECRET-VALUE"}, "format": "hpcllm-checkpoint",
                                   "source": {"path": "TOP-SECRET-VALUE"}}))
    (source / linked).unlink(missing_ok=True)
    (source / linked).symlink_to(private)
    with pytest.raises(InvalidSource, match="outside the source folder") as exc:
        convert(source, tmp_path / "out", progress=False)
    assert "TOP-SECRET-VALUE" not in str(exc.value)
