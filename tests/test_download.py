"""download_file against a real HTTP server on 127.0.0.1 (tests.support.fileserver).

Each scenario switches a fault on in the server and reads the server's own counters to see
what went over the wire: what was re-sent on a resume, which mirror was asked, how many body
bytes a broken mirror got out before the client gave up.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.errors import DownloadError, HashMismatchError
from reconciler.models.download import download_file, new_client, resolve_url
from tests.support.fileserver import Fault, FileServer

SIZE = 3 * 1024 * 1024 + 17  # several network reads and write batches, not a round number


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with new_client(read_timeout_s=5.0) as c:
        yield c


class Progress:
    """Collects the byte deltas download_file reports."""

    def __init__(self) -> None:
        self.deltas: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, delta: int) -> None:
        with self.lock:
            self.deltas.append(delta)

    @property
    def total(self) -> int:
        return sum(self.deltas)


def fetch(
    client: httpx.Client,
    data: bytes,
    dest: Path,
    *urls: str,
    base_url: str | None = None,
    deadline_s: float = 20.0,
    progress: Progress | None = None,
    read_timeout_s: float = 5.0,
) -> None:
    download_file(
        client,
        urls=list(urls),
        base_url=base_url,
        dest_partial=dest,
        size=len(data),
        digest=digest(data),
        progress=progress,
        deadline_s=deadline_s,
        label="demo:v1/weights.bin",
        read_timeout_s=read_timeout_s,
    )


# ------------------------------------------------------------------ happy paths


def test_downloads_file_and_asks_for_identity_encoding(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    dest = tmp_path / "w.partial"
    progress = Progress()

    fetch(client, payload, dest, file_server.url_for("w.bin"), progress=progress)

    assert dest.read_bytes() == payload
    assert progress.total == len(payload)
    (headers,) = file_server.stats.headers("w.bin")
    assert headers["accept-encoding"] == "identity"
    assert "range" not in headers


def test_resolves_relative_urls_against_the_origin(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("mirror/w.bin", payload)
    origin = file_server.url_for("config/")

    fetch(client, payload, tmp_path / "p", "../mirror/w.bin", base_url=origin)

    assert file_server.stats.requests("mirror/w.bin") == 1
    assert resolve_url("/mirror/w.bin", origin) == file_server.url_for("mirror/w.bin")
    assert resolve_url("https://cdn.example/x", origin) == "https://cdn.example/x"


def test_relative_url_without_an_origin_is_a_mirror_failure(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)

    fetch(client, payload, tmp_path / "p", "w.bin", file_server.url_for("w.bin"))

    assert file_server.stats.requests("w.bin") == 1


def test_reads_file_url_mirror(client: httpx.Client, payload: bytes, tmp_path: Path) -> None:
    source = tmp_path / "air gapped" / "w.bin"
    source.parent.mkdir()
    source.write_bytes(payload)
    dest = tmp_path / "p"
    dest.write_bytes(payload[:1000])  # resumed from the local mirror as well

    fetch(client, payload, dest, source.as_uri())

    assert dest.read_bytes() == payload


def test_relative_url_resolves_against_file_origin(
    client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    (origin / "files").mkdir(parents=True)
    (origin / "files" / "w.bin").write_bytes(payload)

    fetch(client, payload, tmp_path / "p", "files/w.bin", base_url=origin.as_uri() + "/")

    assert (tmp_path / "p").read_bytes() == payload


def test_empty_file_needs_no_network(client: httpx.Client, tmp_path: Path) -> None:
    dest = tmp_path / "p"
    fetch(client, b"", dest, "http://127.0.0.1:1/never-asked")
    assert dest.read_bytes() == b""


def test_complete_partial_is_verified_not_downloaded_again(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    dest = tmp_path / "p"
    dest.write_bytes(payload)

    fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert file_server.stats.total_requests() == 0


# ----------------------------------------------------------------------- resume


def test_resumes_cut_download_with_range(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    cut = 1_000_000
    file_server.faults.set("w.bin", cut_after=cut, times=1)
    progress = Progress()

    fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"), progress=progress)

    assert (tmp_path / "p").read_bytes() == payload
    assert file_server.stats.statuses("w.bin") == [200, 206]
    assert file_server.stats.headers("w.bin")[1]["range"] == f"bytes={cut}-"
    # Only the rest was sent again: the server's count is the file's size, no more.
    assert file_server.stats.body_bytes("w.bin") == len(payload)
    assert progress.total == len(payload)


def test_resumes_partial_left_by_an_earlier_run(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    dest = tmp_path / "p"
    dest.write_bytes(payload[:123_457])

    fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert dest.read_bytes() == payload
    assert file_server.stats.headers("w.bin")[0]["range"] == "bytes=123457-"
    assert file_server.stats.body_bytes("w.bin") == len(payload) - 123_457


def test_keeps_partial_after_repeated_cuts_and_resumes_next_time(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", cut_after=200_000)
    dest = tmp_path / "p"

    with pytest.raises(DownloadError) as caught:
        fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert not isinstance(caught.value, HashMismatchError)
    assert "demo:v1/weights.bin" in str(caught.value)
    kept = dest.stat().st_size
    assert kept == 200_000 * file_server.stats.requests("w.bin")
    file_server.faults.clear()
    file_server.stats.reset()
    fetch(client, payload, dest, file_server.url_for("w.bin"))
    assert dest.read_bytes() == payload
    assert file_server.stats.body_bytes("w.bin") == len(payload) - kept


def test_starts_over_when_mirror_ignores_range(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", ignore_range=True)
    dest = tmp_path / "p"
    dest.write_bytes(payload[:5000])
    progress = Progress()

    fetch(client, payload, dest, file_server.url_for("w.bin"), progress=progress)

    assert dest.read_bytes() == payload
    assert file_server.stats.statuses("w.bin") == [200]
    assert progress.total == len(payload)
    assert min(progress.deltas) == -5000


def test_refuses_206_at_another_offset_and_resumes_from_next_mirror(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("a/w.bin", payload)
    file_server.write("b/w.bin", payload)
    file_server.faults.set("a/w.bin", range_shift=-10)
    dest = tmp_path / "p"
    dest.write_bytes(payload[:4096])

    fetch(client, payload, dest, file_server.url_for("a/w.bin"), file_server.url_for("b/w.bin"))

    assert dest.read_bytes() == payload
    assert file_server.stats.headers("b/w.bin")[0]["range"] == "bytes=4096-"


PAYLOAD = os.urandom(SIZE)  # module-level, not a fixture: hypothesis prints its arguments


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.sets(st.integers(min_value=1, max_value=SIZE - 1), min_size=1, max_size=4))
def test_any_sequence_of_cuts_ends_with_the_exact_file_sent_once(
    file_server: FileServer, client: httpx.Client, tmp_path: Path, cuts: set[int]
) -> None:
    file_server.write("w.bin", PAYLOAD)
    file_server.faults.clear()
    file_server.stats.reset()
    dest = tmp_path / "hyp.partial"
    dest.unlink(missing_ok=True)
    offsets = sorted(cuts)
    file_server.faults.queue(
        "w.bin", *(Fault(cut_after=b - a) for a, b in zip([0, *offsets], offsets, strict=False))
    )

    for _attempt in range(len(offsets) + 1):
        try:
            fetch(client, PAYLOAD, dest, file_server.url_for("w.bin"))
            break
        except DownloadError:
            continue  # more cuts than one call's rounds: the next call resumes

    assert dest.read_bytes() == PAYLOAD
    assert file_server.stats.body_bytes("w.bin") == len(PAYLOAD)
    assert file_server.stats.requests("w.bin") == len(offsets) + 1


# ------------------------------------------------------------------- bad content


def test_wrong_bytes_raise_hash_mismatch_and_leave_no_partial(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.faults.set("w.bin", body=bytes(len(payload)))
    dest = tmp_path / "p"

    with pytest.raises(HashMismatchError) as caught:
        fetch(client, payload, dest, file_server.url_for("w.bin"))

    line = caught.value.one_line()
    assert "demo:v1/weights.bin" in line
    assert "digest mismatch" in line
    assert "\n" not in str(caught.value)
    assert not dest.exists()


def test_body_longer_than_declared_stops_at_the_first_extra_byte(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    # No Content-Length: the only way to notice is counting the bytes as they come.
    file_server.faults.set("w.bin", extra=b"x" * 4096, send_length=False)
    dest = tmp_path / "p"

    with pytest.raises(HashMismatchError, match="past the declared"):
        fetch(client, payload, dest, file_server.url_for("w.bin"))

    assert not dest.exists()


def test_content_length_other_than_declared_fails_before_the_body(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", extra=b"x")

    progress = Progress()

    with pytest.raises(HashMismatchError, match=f"{len(payload) + 1} bytes"):
        fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"), progress=progress)

    assert progress.total == 0  # refused on the headers: not one body byte was taken
    assert not (tmp_path / "p").exists()


def test_endless_body_is_cut_off_at_the_declared_size(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.faults.set("w.bin", endless=True)
    started = time.monotonic()

    with pytest.raises(HashMismatchError):
        fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"))

    assert time.monotonic() - started < 10


def test_wrong_mirror_then_good_mirror_succeeds(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("good/w.bin", payload)
    file_server.faults.set("bad/w.bin", body=os.urandom(len(payload)))

    fetch(
        client,
        payload,
        tmp_path / "p",
        file_server.url_for("bad/w.bin"),
        file_server.url_for("good/w.bin"),
    )

    assert (tmp_path / "p").read_bytes() == payload
    assert file_server.stats.headers("good/w.bin")[0].get("range") is None


def test_content_encoding_despite_identity_is_refused(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", headers=(("Content-Encoding", "gzip"),))

    with pytest.raises(DownloadError, match="Content-Encoding 'gzip'"):
        fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"))


def test_unknown_url_scheme_is_a_mirror_failure(client: httpx.Client, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        fetch(client, b"abc", tmp_path / "p", "gopher://127.0.0.1/x")


# ------------------------------------------------------------------- mirrors


@pytest.mark.parametrize("status", [404, 500, 403])
def test_moves_to_next_mirror_when_first_answers_error(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path, status: int
) -> None:
    file_server.write("two/w.bin", payload)
    file_server.faults.set("one/w.bin", status=status)

    fetch(
        client,
        payload,
        tmp_path / "p",
        file_server.url_for("one/w.bin"),
        file_server.url_for("two/w.bin"),
    )

    assert file_server.stats.statuses("one/w.bin") == [status]
    assert file_server.stats.requests("two/w.bin") == 1


def test_all_mirrors_failing_names_the_file_and_last_reason(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.faults.set("one/w.bin", status=500)
    file_server.faults.set("two/w.bin", status=404)

    with pytest.raises(DownloadError) as caught:
        fetch(
            client,
            payload,
            tmp_path / "p",
            file_server.url_for("one/w.bin?X-Amz-Signature=secret"),
            file_server.url_for("two/w.bin"),
        )

    line = caught.value.one_line()
    assert line.startswith("cannot download demo:v1/weights.bin: ")
    assert "two/w.bin: HTTP 404" in line
    assert "secret" not in line  # query strings may carry credentials


def test_follows_redirects_and_gives_up_on_a_loop(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("real/w.bin", payload)
    file_server.faults.set("moved/w.bin", redirect="/real/w.bin")
    fetch(client, payload, tmp_path / "a", file_server.url_for("moved/w.bin"))
    assert (tmp_path / "a").read_bytes() == payload

    file_server.faults.set("loop/w.bin", redirect="/loop/w.bin")
    with pytest.raises(DownloadError, match="too many redirects"):
        fetch(client, payload, tmp_path / "b", file_server.url_for("loop/w.bin"))


def test_unreachable_and_malformed_mirrors_raise_only_project_errors(
    client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    for url in ("http://127.0.0.1:1/w.bin", "http://[::1/w.bin", "http://exa mple/w", "ftp://x/"):
        with pytest.raises(DownloadError):
            fetch(client, payload, tmp_path / "p", url)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(url=st.text(max_size=40))
def test_no_mirror_url_lets_an_httpx_exception_escape(
    file_server: FileServer, client: httpx.Client, tmp_path: Path, url: str
) -> None:
    try:
        fetch(client, b"data", tmp_path / "h", url, base_url=file_server.url)
    except DownloadError:
        pass
    except ValueError as exc:  # only for a malformed digest, which this test never passes
        pytest.fail(f"unexpected ValueError {exc}")
    (tmp_path / "h").unlink(missing_ok=True)


# ---------------------------------------------------------------- slow mirrors


def test_stalled_mirror_hits_the_deadline_within_seconds(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", stall_after=10_000)
    started = time.monotonic()

    with pytest.raises(DownloadError, match=r"timed out|deadline"):
        fetch(
            client,
            payload,
            tmp_path / "p",
            file_server.url_for("w.bin"),
            deadline_s=1.5,
            read_timeout_s=60.0,
        )

    assert time.monotonic() - started < 4.0
    assert (tmp_path / "p").stat().st_size == 10_000  # kept for a resume


def test_trickling_mirror_cannot_hold_the_node(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", trickle_s=0.05)  # bytes keep coming: no read timeout
    started = time.monotonic()

    with pytest.raises(DownloadError, match="deadline"):
        fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"), deadline_s=1.0)

    assert time.monotonic() - started < 3.0


def test_server_that_never_answers_times_out(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.faults.set("w.bin", stall_headers=True)
    started = time.monotonic()

    with pytest.raises(DownloadError):
        fetch(client, payload, tmp_path / "p", file_server.url_for("w.bin"), deadline_s=1.0)

    assert time.monotonic() - started < 3.0


def test_cancel_stops_a_download(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    file_server.faults.set("w.bin", trickle_s=0.01)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()

    with pytest.raises(DownloadError, match="cancelled"):
        download_file(
            client,
            urls=[file_server.url_for("w.bin")],
            base_url=None,
            dest_partial=tmp_path / "p",
            size=len(payload),
            digest=digest(payload),
            progress=None,
            deadline_s=30,
            should_stop=cancel.is_set,
        )


# ------------------------------------------------------------------ local disk


def test_unwritable_destination_is_a_download_error(
    file_server: FileServer, client: httpx.Client, payload: bytes, tmp_path: Path
) -> None:
    file_server.write("w.bin", payload)
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")

    with pytest.raises(DownloadError, match="cannot write"):
        fetch(client, payload, blocker / "p", file_server.url_for("w.bin"))


# --------------------------------------------------------------- the test server


def test_file_server_answers_etag_with_304_and_ranges_with_206(file_server: FileServer) -> None:
    file_server.write("head.json", b'{"serial": 1}')
    with httpx.Client() as http:
        first = http.get(file_server.url_for("head.json"))
        again = http.get(
            file_server.url_for("head.json"), headers={"If-None-Match": first.headers["etag"]}
        )
        part = http.get(file_server.url_for("head.json"), headers={"Range": "bytes=2-"})
        past = http.get(file_server.url_for("head.json"), headers={"Range": "bytes=99-"})
        missing = http.get(file_server.url_for("root/2.json"))

    assert first.headers["content-type"] == "application/json"
    assert again.status_code == 304
    assert part.status_code == 206
    assert part.headers["content-range"] == "bytes 2-12/13"
    assert part.content == b'serial": 1}'
    assert past.status_code == 416
    assert missing.status_code == 404
    assert file_server.stats.requests("/head.json") == 4


def test_file_server_closes_promptly_with_stalled_clients(tmp_path: Path) -> None:
    server = FileServer(tmp_path / "s").start()
    server.faults.set("x", Fault(stall_headers=True))
    server.faults.set("y", endless=True)
    errors: list[BaseException] = []

    def client(path: str) -> None:
        try:
            with httpx.stream("GET", server.url_for(path), timeout=60) as response:
                for _ in response.iter_raw():
                    time.sleep(0.01)
        except httpx.HTTPError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(p,)) for p in ("x", "y")]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.close()
    for thread in threads:
        thread.join(5)

    assert time.monotonic() - started < 2.0
    assert not any(t.is_alive() for t in threads)
    # The stalled request fails; the endless body has no length, so its end is a close.
    assert len(errors) == 1


# ----------------------------------------------- small files: one request, in memory


SMALL = 64 * 1024 + 5  # one request, verified in memory before anything is written


def test_small_file_is_one_request_written_once_verified(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.write("s.bin", data)
    progress = Progress()

    fetch(client, data, tmp_path / "p", file_server.url_for("s.bin"), progress=progress)

    assert (tmp_path / "p").read_bytes() == data
    assert file_server.stats.requests("s.bin") == 1
    assert progress.deltas == [SMALL]


def test_small_file_whose_first_mirror_stalls_comes_from_the_next_after_one_wait(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.write("a/s.bin", data)
    file_server.write("b/s.bin", data)
    file_server.faults.set("a/s.bin", stall_after=1000)
    started = time.monotonic()

    fetch(
        client,
        data,
        tmp_path / "p",
        file_server.url_for("a/s.bin"),
        file_server.url_for("b/s.bin"),
        read_timeout_s=1.0,
    )

    assert (tmp_path / "p").read_bytes() == data
    assert time.monotonic() - started < 1.0 + 1.5  # one stall waited for, not two
    assert file_server.stats.requests("b/s.bin") == 1


def test_small_file_with_wrong_bytes_first_is_taken_from_the_good_mirror(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.write("good/s.bin", data)
    file_server.faults.set("bad/s.bin", body=os.urandom(SMALL))

    fetch(
        client,
        data,
        tmp_path / "p",
        file_server.url_for("bad/s.bin"),
        file_server.url_for("good/s.bin"),
    )

    assert (tmp_path / "p").read_bytes() == data
    assert file_server.stats.requests("bad/s.bin") == 1  # the full path asked the good one first


def test_small_file_cut_on_its_only_mirror_is_asked_again_and_completes(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.write("s.bin", data)
    file_server.faults.queue("s.bin", Fault(cut_after=10_000))

    fetch(client, data, tmp_path / "p", file_server.url_for("s.bin"))

    assert (tmp_path / "p").read_bytes() == data
    assert file_server.stats.requests("s.bin") == 2


def test_small_file_only_mirror_with_wrong_bytes_is_a_mismatch_leaving_nothing(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.faults.set("s.bin", body=os.urandom(SMALL))

    with pytest.raises(HashMismatchError, match="digest mismatch"):
        fetch(client, data, tmp_path / "p", file_server.url_for("s.bin"))

    assert not (tmp_path / "p").exists()


def test_small_file_refused_by_its_mirror_is_asked_once_and_the_next_mirror_serves(
    file_server: FileServer, client: httpx.Client, tmp_path: Path
) -> None:
    data = os.urandom(SMALL)
    file_server.write("ok/s.bin", data)
    file_server.faults.set("gated/s.bin", status=403)

    with pytest.raises(DownloadError, match="403"):
        fetch(client, data, tmp_path / "alone", file_server.url_for("gated/s.bin"))
    fetch(
        client,
        data,
        tmp_path / "p",
        file_server.url_for("gated/s.bin"),
        file_server.url_for("ok/s.bin"),
    )

    assert (tmp_path / "p").read_bytes() == data
    assert file_server.stats.requests("gated/s.bin") == 2  # once per file, never again
    assert not (tmp_path / "alone").exists()
