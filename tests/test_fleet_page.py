"""``reconcile fleet --html``: the page in a real headless Chromium (Debian's ``chromium``).

Chromium loads the written file (``--dump-dom`` prints the DOM after the page's script ran,
``--enable-logging=stderr`` prints console messages as ``…:CONSOLE…`` lines). The page's own
script re-counts its tables against the embedded numbers and sets ``data-checked="ok"`` on
``<html>``; the test checks that mark, the counts in the DOM, that a node's hostile error
text stayed text, and that the console stayed silent. Skips, saying why, without chromium.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from reconciler.cli import cli
from tests.support.reports import node_key, report_payload, signed_report, write_report
from tests.support.signing import canonical, format_time, named_key, sign_envelope

NOW = 1_800_000_000
HOSTILE = '</script><script>document.title="owned"</script><img src=x onerror=alert(1)>'


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/setup installs Debian's chromium)")
    return found


def render_in_chromium(page: Path, profile: Path) -> tuple[str, str]:
    """(the DOM after scripts ran, Chromium's stderr)."""
    done = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode("utf-8"), done.stderr.decode("utf-8", errors="replace")


def write_fleet(folder: Path) -> Path:
    for number in range(7):
        key = node_key(number)
        write_report(folder, key, signed_report(key, report_payload(key, at=NOW - 5)))
    key = node_key(7)
    failing = report_payload(key, at=NOW - 5, converged=False, last_error=HOSTILE)
    write_report(folder, key, signed_report(key, failing))
    key = node_key(8)
    write_report(folder, key, signed_report(key, report_payload(key, at=NOW - 3600)))  # silent
    write_report(folder, node_key(9), b"not json")
    head = folder / "head.json"
    waves = [
        {"at": format_time(NOW - 600), "percent": 30},
        {"at": format_time(NOW), "percent": 100},
    ]
    payload = {
        "network": "testnet",
        "serial": 7,
        "config_digest": "sha256:" + "a" * 64,
        "issued_at": format_time(NOW - 900),
        "expires": format_time(NOW + 86400),
        "rollout": {"waves": waves},
    }
    head.write_bytes(
        sign_envelope("application/vnd.resultity.head+json", canonical(payload), [named_key("k1")])
    )
    return head


def counts_in(dom: str) -> dict[str, str]:
    """Each ``data-count`` cell's name and the number inside it."""
    found = re.findall(r'data-count="([^"]+)"[^>]*>(?:<b>)?(\d+)', dom)
    return {name: number for name, number in found}


def test_the_page_renders_in_chromium_with_the_right_counts_and_no_console_errors(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "reports"
    head = write_fleet(folder)
    page = tmp_path / "fleet.html"
    result = CliRunner().invoke(
        cli,
        ["fleet", str(folder), "--html", str(page), "--head", str(head), "--now", format_time(NOW)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output

    dom, log = render_in_chromium(page, tmp_path / "profile")

    assert 'data-checked="ok"' in dom, dom[-3000:]
    counts = counts_in(dom)
    assert counts["reports.valid"] == "9"
    assert counts["reports.invalid"] == "1"
    assert counts["converged"] == "8"
    assert counts["failing"] == "1"
    assert counts["stale"] == "1"
    assert counts["wave1.nodes"].isdigit() and counts["wave2.nodes"].isdigit()
    assert int(counts["wave1.nodes"]) + int(counts["wave2.nodes"]) == 9
    assert counts["wave2.due"] == counts["wave2.nodes"]  # wave 2 opens at NOW
    assert "<svg" in dom and "8 / 9 converged" in dom
    # The node's text is shown as text: no element of its own, the title untouched.
    assert "owned" not in re.search(r"<title>(.*?)</title>", dom).group(1)  # type: ignore[union-attr]
    assert "<img src=" not in dom and "&lt;img src=x" in dom
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")


def test_the_page_says_so_when_its_script_did_not_run(tmp_path: Path) -> None:
    """The mark is the script's: a page whose script is blocked (here: edited, so its hash
    no longer matches the policy) shows no mark and a console error."""
    folder = tmp_path / "reports"
    write_fleet(folder)
    page = tmp_path / "fleet.html"
    CliRunner().invoke(cli, ["fleet", str(folder), "--html", str(page)], catch_exceptions=False)
    page.write_text(page.read_text().replace("JSON.parse(", "JSON.parse ("))

    dom, log = render_in_chromium(page, tmp_path / "profile")

    assert 'data-checked="ok"' not in dom
    assert "not checked (script did not run)" in dom
    assert any("Content Security Policy" in line for line in log.splitlines())
