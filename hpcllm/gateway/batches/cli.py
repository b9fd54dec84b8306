"""`hpcllm batch submit|status|cancel|download`: the Batch API from a shell, with the user's API key.

Import-light (no Flask, no gateway app): the command talks to the gateway over HTTP as any client would.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from hpcllm.config import load_config
from hpcllm.errors import HpcllmError
from hpcllm.gateway.batches import ENDPOINTS, FINAL
from hpcllm.gateway.files import EXPIRES_MAX_S, EXPIRES_MIN_S, PAGE_MAX
from hpcllm.gateway.cli import (GATEWAY_URL_ENV, GatewayRefused, GatewayUnreachable, gateway_client, gateway_json,
                                resolve_gateway_url)

API_KEY_ENVS = ["HPCLLM_API_KEY", "OPENAI_API_KEY"]
POLL_S = 5.0
# Answers that say the gateway is busy or away for now: the key's rate limit (which the batch's own requests keep
# used up: a batch runs as fast as it allows), a gateway draining or restarting, a proxy's 502/504. --wait polls
# again: the batch runs on meanwhile.
BUSY_STATUSES = (429, 502, 503, 504)
# How long --wait polls on while no poll gets an answer (unreachable, 502-504) before it gives up, exit 1: a gateway
# gone for good would keep it polling until an sbatch job's walltime ran out. A 429 is the gateway answering: polled
# on however long (the batch's own requests keep the key's rate limit used up until it ends).
GONE_GIVE_UP_S = 30 * 60
# The longest a Retry-After keeps --wait from polling (a gateway's is seconds; a proxy's may be anything).
RETRY_AFTER_MAX_S = 60.0


class BatchNotCompleted(HpcllmError):
    """The batch ended but not completed: scripts chain on `submit --wait`, so each ending has its own exit status
    (apart from the CLI's 1, an error, and 2, a bad argument)."""

    EXIT_CODES = {"failed": 10, "expired": 11, "cancelled": 12}

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.exit_code = self.EXIT_CODES[status]


def _common(command):
    command = click.option("--api-key", envvar=API_KEY_ENVS, default=None,
                           help="Your API key (default: $HPCLLM_API_KEY, else $OPENAI_API_KEY).")(command)
    command = click.option("--url", "gateway_url", default=None,
                           help=f"Gateway URL (default: ${GATEWAY_URL_ENV}, else http://gateway.host:gateway.port "
                                f"of --config).")(command)
    return click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                        help="hpcllm TOML config (default: $HPCLLM_CONFIG); only for the gateway's address.")(command)


class BatchClient:
    """The gateway's Batch and Files APIs for one command."""

    def __init__(self, config_path: Path | None, gateway_url: str | None, api_key: str | None):
        config = load_config(config_path)
        self.url = resolve_gateway_url(config, gateway_url)
        self.http = gateway_client(config, self.url, api_key, timeout_s=300.0)

    def json(self, method: str, path: str, **kwargs) -> dict:
        return gateway_json(self.http, self.url, method, path, **kwargs)

    def batches(self) -> list[dict]:
        """The key's batches, newest first: every page of the list. The batch a page ended on may be deleted before
        the next page is asked for (the sweep deletes an ended batch with its expired files): the gateway refuses it
        as `after` (400), and the list is read again from the start, once."""
        found: list[dict] = []
        again = True
        while True:
            after = {"after": found[-1]["id"]} if found else {}
            try:
                page = self.json("GET", "/v1/batches", params={"limit": PAGE_MAX, **after})
            except GatewayRefused as exc:
                if not (exc.status == 400 and after and again):
                    raise
                found, again = [], False
                continue
            found += page["data"]
            if not (page.get("has_more") and page["data"]):
                return found

    def wait(self, found: dict) -> dict:
        """The batch once it has ended, polled every POLL_S and its progress printed. A poll the gateway is busy or
        away for (BUSY_STATUSES, unreachable) is said on stderr once until one gets through, and polled again (after
        its Retry-After, at most RETRY_AFTER_MAX_S); no answer for GONE_GIVE_UP_S (the gateway gone for good) is an
        error naming the batch."""
        told, gone_since, delay = False, None, POLL_S
        while found["status"] not in FINAL:
            time.sleep(delay)
            delay = POLL_S
            try:
                found = self.json("GET", f"/v1/batches/{found['id']}")
            except GatewayRefused as exc:
                if exc.status not in BUSY_STATUSES:
                    raise
                reason = str(exc)
                gone_since = None if exc.status == 429 else (gone_since or time.monotonic())
                delay = min(max(POLL_S, exc.retry_after or 0.0), RETRY_AFTER_MAX_S)  # as the gateway asks
            except GatewayUnreachable as exc:  # reached at this URL before: no advice to change it
                reason = exc.what
                gone_since = gone_since or time.monotonic()
            else:
                told, gone_since = False, None
                _report(found)
                continue
            if gone_since is not None and time.monotonic() - gone_since >= GONE_GIVE_UP_S:
                raise HpcllmError(f"gave up waiting for batch {found['id']}: no answer from the gateway for "
                                  f"{GONE_GIVE_UP_S / 60:g} min ({reason}); the batch may still run: hpcllm batch "
                                  f"status {found['id']} checks it")
            if not told:
                click.echo(f"{reason}; the batch runs on, polling again every {POLL_S:g} s", err=True)
                told = True
        return found

    def create_batch(self, file_id: str, request: dict) -> dict:
        """The batch over an uploaded file. When the gateway refuses it (a 4xx: nothing was made) the file is
        deleted, as it would count against the key's quota unused; after any other failure a batch may exist over
        it, so it is kept."""
        try:
            return self.json("POST", "/v1/batches", json={"input_file_id": file_id, **request})
        except GatewayRefused as refused:
            if refused.status >= 500:
                raise
            left = self.forget(file_id)
            if left is not None:
                raise HpcllmError(f"{refused}; {left}") from refused
            raise

    def forget(self, file_id: str) -> str | None:
        """Delete an upload no batch runs (it would count against the key's quota unused, and no command lists it);
        None, or why it is left."""
        try:
            self.json("DELETE", f"/v1/files/{file_id}")
        except HpcllmError as exc:
            return f"the uploaded file {file_id} is left, deleting it failed: {exc}"
        return None

    def download(self, file_id: str, target: Path) -> int:
        """A file's bytes to `target` (written beside it, then renamed: never half a file); its size. A transfer cut
        off (the gateway restarts, a proxy times out) is one clear error, nothing left at `target`."""
        import httpx

        from hpcllm.httpkit.client import error_of

        partial = target.with_name(f".{target.name}.part")
        try:
            with self.http.stream("GET", f"/v1/files/{file_id}/content") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise GatewayRefused(resp.status_code, error_of(resp)[1])
                with open(partial, "wb") as out:
                    for chunk in resp.iter_bytes():
                        out.write(chunk)
            os.replace(partial, target)
        except httpx.HTTPError as exc:
            raise HpcllmError(f"downloading {file_id} from {self.url} failed, {target} was not written ({exc}); "
                              f"download it again") from None
        except OSError as exc:  # a folder that does not exist or is not writable, a full disk
            raise HpcllmError(f"cannot write {target}: {exc.strerror or exc} (give a file in a folder you may "
                              f"write: --output, --errors)") from None
        finally:
            partial.unlink(missing_ok=True)
        return target.stat().st_size


@click.group("batch")
def batch() -> None:
    """Run a JSONL file of requests offline (OpenAI's Batch API): submit, status, cancel, download."""


@batch.command("submit")
@click.argument("requests", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", type=click.Choice(ENDPOINTS), default=ENDPOINTS[0], show_default=True,
              help="What every line calls.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="A metadata pair (repeatable).")
@click.option("--wait", is_flag=True, help="Wait until the batch ends, printing its progress.")
@click.option("--keep-hours", type=click.IntRange(EXPIRES_MIN_S // 3600, EXPIRES_MAX_S // 3600), default=None,
              help="Delete the input file and the results this many hours after each is made (never later than "
                   "the site's retention, its default).")
@_common
def submit(requests: Path, endpoint: str, metadata: tuple[str, ...], wait: bool, keep_hours: int | None,
           config_path: Path | None, gateway_url: str | None, api_key: str | None) -> None:
    """Upload REQUESTS (JSONL: custom_id, method, url, body per line) and start a batch over it."""
    pairs = dict(_pair(item) for item in metadata)
    gateway = BatchClient(config_path, gateway_url, api_key)
    expiry = None if keep_hours is None else {"anchor": "created_at", "seconds": keep_hours * 3600}
    # OpenAI's multipart spelling of the upload's expires_after, as the openai client sends it.
    form = {"purpose": "batch", **({f"expires_after[{k}]": str(v) for k, v in expiry.items()} if expiry else {})}
    with open(requests, "rb") as source:
        uploaded = gateway.json("POST", "/v1/files", files={"file": (requests.name, source)}, data=form)
    created = gateway.create_batch(uploaded["id"], {"endpoint": endpoint, "completion_window": "24h",
                                                    "metadata": pairs or None, "output_expires_after": expiry})
    click.echo(created["id"])
    _report(created)
    if created["status"] == "failed":  # the file was refused (_check_not_failed says why): no batch reads it
        left = gateway.forget(uploaded["id"])
        if left is not None:
            click.echo(f"warning: {left}", err=True)
    if wait:
        created = gateway.wait(created)
        _check_completed(created)
    _check_not_failed(created)


@batch.command("status")
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="The Batch object(s) as the API returns them.")
@_common
def status(batch_id: str | None, as_json: bool, config_path: Path | None, gateway_url: str | None,
           api_key: str | None) -> None:
    """One batch's status and counts; without BATCH_ID, your batches, newest first."""
    gateway = BatchClient(config_path, gateway_url, api_key)
    if batch_id is None:
        found = gateway.batches()
    else:
        found = [gateway.json("GET", f"/v1/batches/{batch_id}")]
    if as_json:
        click.echo(json.dumps(found if batch_id is None else found[0], indent=2))
        return
    for item in found:
        _report(item, with_id=batch_id is None)


@batch.command("cancel")
@click.argument("batch_id")
@_common
def cancel(batch_id: str, config_path: Path | None, gateway_url: str | None, api_key: str | None) -> None:
    """Stop starting BATCH_ID's requests; what finished is kept."""
    _report(BatchClient(config_path, gateway_url, api_key).json("POST", f"/v1/batches/{batch_id}/cancel"))


@batch.command("download")
@click.argument("batch_id")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the answers go (default: BATCH_ID_output.jsonl).")
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the failed requests go (default: BATCH_ID_errors.jsonl).")
@_common
def download(batch_id: str, output: Path | None, errors: Path | None, config_path: Path | None,
             gateway_url: str | None, api_key: str | None) -> None:
    """Save a finished batch's output and error files."""
    output, errors = output or Path(f"{batch_id}_output.jsonl"), errors or Path(f"{batch_id}_errors.jsonl")
    if output.resolve() == errors.resolve():  # the error file would replace the answers
        raise click.BadParameter(f"{errors} is the --output file too; give the answers and the failed requests two "
                                 f"files", param_hint="--errors")
    gateway = BatchClient(config_path, gateway_url, api_key)
    found = gateway.json("GET", f"/v1/batches/{batch_id}")
    if found["status"] not in FINAL:
        raise HpcllmError(f"batch {batch_id} is {found['status']}: its files are there once it has ended "
                          f"(hpcllm batch submit --wait, or hpcllm batch status {batch_id})")
    targets = (("output_file_id", output), ("error_file_id", errors))
    present = [(found[field], target) for field, target in targets if found.get(field)]
    for file_id, target in present:
        click.echo(f"{target} ({gateway.download(file_id, target)} bytes)")
    _check_not_failed(found)  # after saving what a batch that failed while running finished
    if not present:
        click.echo(f"batch {batch_id} ({found['status']}) has no results: none of its requests ran")


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--metadata")
    return key, value


def _report(found: dict, with_id: bool = False) -> None:
    counts = found.get("request_counts") or {}
    prefix = f"{found['id']} " if with_id else ""
    click.echo(f"{prefix}{found['status']}: {counts.get('completed', 0)} completed, {counts.get('failed', 0)} "
               f"failed of {counts.get('total', 0)}")


def _check_not_failed(found: dict) -> None:
    if found["status"] != "failed":
        return
    errors = (found.get("errors") or {}).get("data") or []
    lines = "; ".join(("" if e.get("line") is None else f"line {e['line']}: ") + f"{e.get('code')}: {e.get('message')}"
                      for e in errors[:10])
    # A batch refused at creation never went in progress; one that did failed while it ran (its input was fine).
    why = "the input file was refused" if found.get("in_progress_at") is None else "running it failed"
    raise BatchNotCompleted("failed", f"batch {found['id']} failed: {why} ({lines})")


def _check_completed(found: dict) -> None:
    """A batch that ended expired or cancelled is an error (failed: _check_not_failed's)."""
    if found["status"] not in ("expired", "cancelled"):
        return
    counts, status = found.get("request_counts") or {}, found["status"]
    raise BatchNotCompleted(status, f"batch {found['id']} ended {status}: {counts.get('completed', 0)} completed of "
                                    f"{counts.get('total', 0)} (what finished: hpcllm batch download {found['id']})")
