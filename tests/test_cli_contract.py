"""The command line as users meet it (docs/cli.md): every command's --help and --version,
a table of bad inputs that must each end in one line naming what is wrong with the right
exit code and no traceback, and the behaviours that must not lose data: Ctrl-C, a typo in
the pass directory, a full disk, waits on a noisy line."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest
from distil_passgen import make_pass

from host.cli import COMMANDS, build_parser, main, version
from host.formats.qdet import write_detections

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ help and version


def _command_parsers(name: str) -> list[argparse.ArgumentParser]:
    """The command's parser and, for commands with actions (payload), each action's."""
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = [sub.choices[name]]
    for action in found[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.values())
    return found


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help_with_defaults_examples_and_exit_codes(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"qkdsat {name}" in text.split("examples:")[1]
    assert "exit codes:" in text and "130" in text
    assert "DESIGN.md" not in text
    for parser in _command_parsers(name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"qkdsat {name}: {action.dest} has no help text"
            if action.dest in ("key", "provision_key"):  # a file's name, never the key
                assert action.metavar == "FILE" and "FILE" in action.help, action.dest
            shown = parser.formatter_class(prog="x")._get_help_string(action)
            if action.option_strings and action.default not in (
                None,
                False,
                [],
                argparse.SUPPRESS,
            ):
                assert "default" in shown, f"qkdsat {name} {action.dest}: default not shown"


def test_top_level_help_lists_exit_codes_and_cites_nothing_users_lack(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "DESIGN.md" not in text
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in text


@pytest.mark.parametrize("argv", [["--version"], ["distil", "--version"]])
def test_version(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"qkdsat {version()}"
    assert version()[0].isdigit()


def test_profiles_are_listed_as_text_json_or_not_at_all(capsys):
    assert main(["simulate", "--list-profiles"]) == 0
    rows = capsys.readouterr().out.splitlines()
    names = ["jinan-1", "jinan-1-stress10x", "micius-2017"]
    assert [row.split()[0] for row in rows] == names
    assert main(["simulate", "--list-profiles", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(names)
    assert main(["simulate", "--list-profiles", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ the bad-input table


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory of small, real inputs: pass directories (only pass.json and empty
    data files: every case below is refused before the data is read), a file where a
    directory is expected, a key pool."""
    root = tmp_path_factory.mktemp("inputs")
    good = {
        "format_version": 1,
        "basis_probability_z": 0.5,
        "intensities": {"mu": 0.8, "nu": 0.1, "vac": 0.0},
        "intensity_probabilities": {"mu": 0.5, "nu": 0.25, "vac": 0.25},
        "slot_rate_hz": 1e8,
        "utc_start": "2017-01-01T00:00:00Z",
    }

    def pass_dir(name, pass_json, ground=("detections.qdet", "pps.qdet")):
        folder = root / name
        (folder / "ground").mkdir(parents=True)
        (folder / "satellite").mkdir()
        text = pass_json if isinstance(pass_json, str) else json.dumps(pass_json)
        (folder / "pass.json").write_text(text)
        for data in ground:
            (folder / "ground" / data).write_bytes(b"")
        return folder

    pass_dir("good", good)
    pass_dir("list", "[1, 2]")
    pass_dir("wrong-type", {**good, "slot_rate_hz": "fast"})
    pass_dir("missing-key", {k: v for k, v in good.items() if k != "intensities"})
    pass_dir("negative-mu", {**good, "intensities": {"mu": -0.8, "nu": 0.1, "vac": 0.0}})
    pass_dir("negative-rate", {**good, "slot_rate_hz": -1e8})
    pass_dir("no-pps", good, ground=("detections.qdet",))
    no_generator = pass_dir("no-generator", good)
    (no_generator / "satellite" / "pattern_source.json").write_text(
        json.dumps({"format_version": 1, "kind": "insecure-test-pattern", "seed": 7})
    )
    (root / "old-pass").mkdir()
    (root / "old-pass" / "pass.json").write_text("{}")
    (root / "leftovers" / "ground").mkdir(parents=True)
    (root / "a-file").write_text("not a directory\n")
    (root / "pool").write_bytes(os.urandom(4096))
    (root / "counter-garbage").write_text("twelve\n")
    (root / "counter-dir").mkdir()
    # the project's test TLE with a mean motion of 25.5 rev/day: a 4,875 km orbit radius
    name, line1, line2 = (ROOT / "tests" / "data" / "micius-like.tle").read_text().splitlines()
    line2 = line2[:52] + "25.50000000" + line2[63:68]
    line2 += str(_tle_checksum(line2))
    (root / "inside-earth.tle").write_text(f"{name}\n{line1}\n{line2}\n")
    write_detections(root / "tags.qdet", np.array([1, 2, 3]), np.array([0, 1, 2]))
    (root / "huge-time.csv").write_text("time_ps,channel\n5,1\n99999999999999999999999,1\n")
    (root / "huge-channel.csv").write_text("time_ps,channel\n5,99999999999999999999999\n")
    return root


def _tle_checksum(line: str) -> int:
    return sum(int(c) if c.isdigit() else c == "-" for c in line[:68]) % 10


KEY_MATERIAL = "8f" * 32  # what a user might paste instead of a key file's name

# (name, argv with {d} for the inputs folder, exit code, what the one line must say)
BAD_INPUTS = [
    ("distil pass dir typo", "distil {d}/goood --out {d}/o", 2, "pass.json: missing"),
    ("distil qber nan", "distil {d}/good --out {d}/o --qber-threshold nan", 2, "--qber-thr"),
    ("distil qber -1", "distil {d}/good --out {d}/o --qber-threshold -1", 2, "--qber-thr"),
    ("distil listen no role", "distil {d}/good --out {d}/o --listen :7000", 2, "--role"),
    ("distil connect no role", "distil {d}/good --out {d}/o --connect h:1", 2, "--role"),
    ("distil out is a file", "distil {d}/good --out {d}/a-file", 2, "not a directory"),
    (
        "distil seed -1",
        "distil {d}/good --out {d}/o --insecure-deterministic-seed -1",
        2,
        "--insecure-deterministic-seed -1",
    ),
    ("distil pass.json list", "distil {d}/list --out {d}/o", 2, "expected a JSON object"),
    ("distil wrong type", "distil {d}/wrong-type --out {d}/o", 2, "slot_rate_hz must be"),
    ("distil missing key", "distil {d}/missing-key --out {d}/o", 2, "missing intensities"),
    ("distil negative mu", "distil {d}/negative-mu --out {d}/o", 2, "intensities.mu -0.8"),
    ("distil negative rate", "distil {d}/negative-rate --out {d}/o", 2, "slot_rate_hz -1"),
    ("distil missing pps", "distil {d}/no-pps --out {d}/o", 2, "pps.qdet: missing"),
    (
        "distil pattern source without generator",
        "distil {d}/no-generator --out {d}/o",
        2,
        "generator missing",
    ),
    (
        "distil listen port 99999",
        "distil {d}/good --out {d}/o --role alice --auth-pool {d}/pool --listen :99999",
        2,
        "port in 1..65535",
    ),
    ("track offset nan", "track --out {d}/t --offset-urad nan nan", 2, "finite number of urad"),
    ("track offset inf", "track --out {d}/t --offset-urad inf 0", 2, "finite number of urad"),
    ("track offset 1e12", "track --out {d}/t --offset-urad 1e12 0", 2, "within +-100000 urad"),
    ("track dropout -1", "track --out {d}/t --dropout 1 -1", 2, "positive number of seconds"),
    ("track dropout start", "track --out {d}/t --dropout -2 1", 2, "START_S -2"),
    ("track seed -1", "track --out {d}/t --seed -1", 2, "--seed -1"),
    ("track out is a file", "track --out {d}/a-file", 2, "not a directory"),
    ("track loop rate 0", "track --out {d}/t --set loop_rate_hz=0", 2, "loop_rate_hz=0"),
    ("track loop rate -5", "track --out {d}/t --set loop_rate_hz=-5", 2, "500, 1000, 2000"),
    ("track loop rate 1e308", "track --out {d}/t --set loop_rate_hz=1e308", 2, "4000 Hz"),
    ("mission seed -1", "mission --out {d}/m --seed -1", 2, "--seed -1"),
    ("mission out is a file", "mission --out {d}/a-file", 2, "not a directory"),
    ("mission budget nan", "mission --out {d}/m --budget-s nan", 2, "--budget-s nan"),
    ("simulate out is a file", "simulate --profile jinan-1 --out {d}/a-file", 2, "a-file"),
    (
        "simulate over a pass",
        "simulate --profile jinan-1 --out {d}/old-pass",
        2,
        "--force replaces it",
    ),
    (
        "simulate over leftovers",
        "simulate --profile jinan-1 --out {d}/leftovers",
        2,
        "leftovers of an interrupted simulation",
    ),
    (
        "simulate 13.7 GB pattern log",
        "simulate --profile micius-2017 --pattern log --out {d}/s",
        2,
        "13.7 GB pattern log",
    ),
    (
        "simulate pattern secret with a typo",
        f"simulate --profile jinan-1 --out {{d}}/s --pattern-secret {KEY_MATERIAL[:31]}g",
        2,
        "--pattern-secret: expected 32 hex digits",
    ),
    (
        "simulate set unknown key",
        "simulate --profile jinan-1 --out {d}/s --set detectors.nope=1",
        2,
        "valid keys here: detectors.afterpulse_probability",
    ),
    (
        "simulate TLE inside the Earth",
        "simulate --profile micius-2017 --tle {d}/inside-earth.tle --out {d}/s",
        2,
        "inside the Earth",
    ),
    (
        "timetags out is a directory",
        "timetags {d}/tags.qdet --out {d}/counter-dir",
        2,
        "counter-dir",
    ),
    ("timetags time beyond 64 bits", "timetags {d}/huge-time.csv --out {d}/t.qdet", 2, "line 3"),
    ("timetags huge channel", "timetags {d}/huge-channel.csv --out {d}/t.qdet", 2, "0..32767"),
    ("timetags out in a file", "timetags {d}/tags.qdet --out {d}/a-file/x.csv", 2, "a-file"),
    ("kms pki in a file", "kms pki --pki {d}/a-file --sae a,b", 2, "--pki"),
    ("kms pki without SAEs", "kms pki --pki {d}/pki --sae ,", 2, "--sae"),
    ("pool status network typo", "pool status --network {d}/netwrok", 2, "--network"),
    ("payload baud negative", "payload --port /dev/null --baud -9600 status", 2, "--baud -9600"),
    ("payload no port", "payload status", 2, "--port: required"),
    (
        "payload options after the action",
        "payload status --port /dev/null --timeout nan",
        2,
        "--timeout nan",
    ),
    ("flash timeout zero", "flash --port /dev/null --timeout 0", 2, "--timeout 0"),
    (
        "payload counter file garbage",
        "payload --port /dev/null --counter-file {d}/counter-garbage status",
        2,
        "expected one integer (the telecommand counter)",
    ),
    (
        "payload counter file is a directory",
        "payload --port /dev/null --counter-file {d}/counter-dir status",
        2,
        "--counter-file",
    ),
    (
        "payload key given as the key itself",
        f"payload --port /dev/null --key {KEY_MATERIAL} status",
        2,
        "never the key itself",
    ),
    (
        "distil auth pool given as the key itself",
        f"distil {{d}}/good --out {{d}}/o --auth-pool {KEY_MATERIAL}",
        2,
        "never the key itself",
    ),
    (
        "flash link key given as the key itself",
        f"flash --port /dev/null --key {KEY_MATERIAL}",
        2,
        "never the key itself",
    ),
    (
        "flash key given as the key itself",
        f"flash --port /dev/null --provision-key {KEY_MATERIAL}",
        2,
        "never the key itself",
    ),
]


@pytest.mark.parametrize("name,argv,code,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_with_its_exit_code(files, capsys, name, argv, code, message):
    args = argv.format(d=files).split()
    assert main(args) == code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"qkdsat {args[0]}: error: ")
    assert message in err
    assert KEY_MATERIAL not in err  # never echo what could be key material
    assert KEY_MATERIAL[:31] not in err


def test_listen_on_an_address_in_use_is_one_line_without_claiming_to_listen(
    small_pass, tmp_path, capsys
):
    """The "listening on" line is for the peer's operator: it used to be printed before
    the bind, so a busy port gave "bob listening on ..." and then the bind error."""
    import socket

    pool = tmp_path / "pool"
    pool.write_bytes(os.urandom(4096))
    pool.chmod(0o600)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = ["distil", str(small_pass), "--out", str(tmp_path / "o"), "--role", "bob"]
        argv += ["--listen", f"127.0.0.1:{port}", "--auth-pool", str(pool), "--new-auth-pool"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkdsat distil: error: --listen 127.0.0.1:{port}: ")
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_no_peer_to_connect_to_is_a_link_failure_exit_1_with_the_outputs_kept(
    small_pass, previous_run, tmp_path, monkeypatch, capsys
):
    """--connect to a port where nobody listens (real socket, retries cut from 30 s to
    0.3 s): the link failed before the protocol began. It said "aborted" with exit 3,
    which promises a report.json with the reason; there is none, the outputs are kept."""
    import functools
    import socket

    from host.distil import channel as ch

    monkeypatch.setattr(ch, "connect", functools.partial(ch.connect, retry_s=0.3))
    pool = tmp_path / "pool"
    pool.write_bytes(os.urandom(4096))
    pool.chmod(0o600)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # free once closed: nobody listens there
    before = _outputs(previous_run)
    argv = ["distil", str(small_pass), "--out", str(previous_run), "--role", "alice"]
    argv += ["--connect", f"127.0.0.1:{port}", "--auth-pool", str(pool), "--new-auth-pool"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"qkdsat distil: failed: --connect 127.0.0.1:{port}: cannot connect")
    assert len(err.splitlines()) == 1
    assert _outputs(previous_run) == before


def test_key_material_in_the_environment_is_not_echoed(files, capsys, monkeypatch):
    monkeypatch.setenv("QKDSAT_LINK_KEY", KEY_MATERIAL)
    assert main(["payload", "--port", "/dev/null", "status"]) == 2
    err = capsys.readouterr().err
    assert "QKDSAT_LINK_KEY" in err and KEY_MATERIAL not in err


def test_a_missing_firmware_build_is_an_environment_failure_not_a_bug(
    tmp_path, monkeypatch, capsys
):
    """`qkdsat smoke --target qemu` before `make firmware` said "internal error ... report
    it"; a missing build is the machine's setup: exit 1 with what to run."""
    import emulator.targets

    monkeypatch.setattr(emulator.targets, "MICROPYTHON_BIN", tmp_path / "no" / "micropython")
    assert main(["smoke", "--target", "unix"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qkdsat smoke: failed: MicroPython unix port not found at ")
    assert "make setup" in err and "internal error" not in err
    assert len(err.splitlines()) == 1


def test_a_bug_is_one_line_exit_1_and_the_traceback_only_with_debug(capsys, monkeypatch):
    import host.smoke

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(host.smoke, "run", broken)
    assert main(["smoke"]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "--debug" in err and "Traceback" not in err
    assert main(["smoke", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_track_that_never_acquires_exits_3_and_keeps_its_products(tmp_path, capsys):
    out = tmp_path / "track"
    argv = ["track", "--out", str(out), "--duration-s", "0.5", "--dropout", "0", "inf"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err == f"qkdsat track: aborted: the loop never reached FINE in 0.5 s (see {out}/" + (
        "tracking.json)"
    )
    assert json.loads((out / "tracking.json").read_text())["acquisition_s"] is None
    assert (out / "truth" / "pointing.qrec").stat().st_size > 0


# ------------------------------------------------------------------ distil: no lost data


def _outputs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def previous_run(tmp_path):
    """An output directory as a previous successful run left it."""
    out = tmp_path / "keys"
    out.mkdir()
    (out / "alice.key").write_bytes(b"previous key bytes")
    (out / "bob.key").write_bytes(b"previous key bytes")
    (out / "report.json").write_text(json.dumps({"aborted": False, "key_bits": 144}))
    return out


def test_a_typo_in_the_pass_dir_keeps_the_previous_keys(tmp_path, previous_run, capsys):
    before = _outputs(previous_run)
    assert main(["distil", str(tmp_path / "typo"), "--out", str(previous_run)]) == 2
    assert "typo" in capsys.readouterr().err
    assert _outputs(previous_run) == before


def test_progress_lines_on_a_terminal_and_not_in_a_pipe(monkeypatch, capsys):
    from host.console import progress_for

    args = argparse.Namespace(quiet=False, verbose=False, json=False)
    progress_for(args, "qkdsat x")("piped")
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "stderr", terminal)
            progress_for(args, "qkdsat x")("on a terminal")
            quiet = argparse.Namespace(quiet=True, verbose=False, json=False)
            progress_for(quiet, "qkdsat x")("quiet")
        shown = b""
        while _readable(master):
            shown += os.read(master, 4096)
        assert b"qkdsat x: [" in shown and b"on a terminal" in shown
        assert b"quiet" not in shown
    finally:
        os.close(master)
        os.close(slave)


def _readable(fd) -> bool:
    import select

    return bool(select.select([fd], [], [], 0.05)[0])


def test_distil_json_and_report_metadata_on_an_abort(tmp_path, capsys):
    """--json prints the report; the report says which tool, inputs and settings made it
    (here: an abort for QBER above threshold, found right after the sample)."""
    # the abort is decided on a CSPRNG sample of ~640 Z bits: at 22 % misalignment the
    # threshold (11 %) is 6.7 sigma below its mean (at 14 % it was 2.2 sigma)
    pass_dir = make_pass(tmp_path / "pass", duration_s=1.0, misalignment=0.22, seed=4)
    out = tmp_path / "out"
    assert main(["distil", str(pass_dir), "--out", str(out), "--json", "--verbose"]) == 3
    captured = capsys.readouterr()
    for stage in ("stage: sync", "stage: sifting", "stage: estimation"):
        assert stage in captured.err  # --verbose: stage lines, on stderr only
    printed = json.loads(captured.out)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["aborted"] and "QBER above threshold" in printed["abort_reason"]
    assert printed["format_version"] == 2 and printed["tool"]["version"] == version()
    assert printed["qber_threshold"] == 0.11 and printed["deterministic_randomness"] is False
    assert printed["key_files"] == {} and printed["created_utc"]
    assert len(printed["inputs"]["pass_json_sha256"]) == 64
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("qkdsat distil: aborted: QBER above threshold")


def test_ctrl_c_while_the_command_loads_is_one_line_exit_130(monkeypatch, capsys):
    """Importing distil's modules takes seconds on a loaded machine; an interrupt then used
    to end in a KeyboardInterrupt traceback (exit -2) instead of the documented 130."""
    import host.cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(host.cli.importlib, "import_module", interrupted)
    try:
        code = main(["distil", "pass", "--out", "o"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped main() as a traceback")
    assert code == 130
    assert capsys.readouterr().err == "qkdsat distil: interrupted\n"


INTERRUPTED_IN_CPP = """
import sys, threading, time
import numpy as np, scipy.fft
import host.cli, host.smoke

def endpoint():  # an endpoint thread inside a C++ call, as distil's sync is (scipy.fft)
    x = np.random.default_rng(1).random(1 << 20)
    while True:
        scipy.fft.rfft(x)

def run(args):
    threading.Thread(target=endpoint, daemon=True).start()
    time.sleep(0.5)
    raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

host.smoke.run = run
sys.argv[1:] = ["smoke"]
sys.exit(host.cli.main())
"""


def test_ctrl_c_with_an_endpoint_inside_cpp_code_exits_130_not_sigabrt():
    """An interrupted `distil` whose endpoint thread is still in scipy.fft when the process
    ends: the interpreter's shutdown killed that thread with a forced unwind and C++ aborted
    the process ("terminate called without an active exception", exit 134), seen on one
    Ctrl-C of `distil --role bob` in five."""
    proc = subprocess.run(
        [PY, "-c", INTERRUPTED_IN_CPP], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "qkdsat smoke: interrupted\n"


@pytest.fixture(scope="module")
def small_pass(tmp_path_factory):
    return make_pass(tmp_path_factory.mktemp("cli") / "pass", duration_s=1.0, seed=3)


@pytest.mark.slow
def test_ctrl_c_in_distil_ends_both_endpoints_exits_130_and_keeps_the_outputs(
    small_pass, previous_run
):
    before = _outputs(previous_run)
    proc = subprocess.Popen(
        [PY, "-m", "host.cli", "distil", str(small_pass), "--out", str(previous_run)]
        + ["--verbose", "--insecure-deterministic-seed", "1"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        # a terminal's Ctrl-C: the child starts with SIGINT at its default, whatever this
        # process inherited (an ignored SIGINT is inherited, and Python then keeps it
        # ignored: the run went on to exit 3 in a CI run)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert "started" in proc.stderr.readline()  # both endpoints run now
        # Interrupt as synchronisation begins: a fixed sleep raced the run, which now
        # ends in ~1.2 s on this pass (a 1 s sleep saw exit 3 in CI, the run already done).
        assert "stage: sync" in proc.stderr.readline()
        assert proc.poll() is None, "the run ended before the interrupt"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=10)
        waited_s = time.monotonic() - sent
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert waited_s < 2.0  # both endpoints end within a second, plus process exit
    assert _outputs(previous_run) == before


def _fill_tmpfs(mount: Path, leave_pages: int) -> None:
    """Fill the tmpfs so that leave_pages 4 KiB pages stay free."""
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    (mount / "filler").write_bytes(b"\0" * (free - leave_pages * 4096))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root; skipped otherwise)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_while_keys_are_written_leaves_no_report_claiming_a_key(small_tmpfs):
    """Keys of 20,000 bits (2,500 bytes: one page each) with one page left: the report
    used to go first and fit, then a key failed. Now the keys go first, the failure is an
    environment error (exit 1), and whatever report exists says aborted."""
    from host.distil.run import finish
    from host.errors import EnvironmentFailure

    out = small_tmpfs / "keys"
    out.mkdir()
    _fill_tmpfs(small_tmpfs, leave_pages=1)
    key = np.random.default_rng(1).integers(0, 2, 20_000, dtype=np.uint8)
    report = {"aborted": False, "abort_reason": None, "key_bits": int(key.size)}
    with pytest.raises(EnvironmentFailure, match="No space left"):
        finish(out, report, {"alice": key, "bob": key.copy()})
    assert not (out / "alice.key").exists() and not (out / "bob.key").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if (out / "report.json").exists():
        written = json.loads((out / "report.json").read_text())
        assert written["aborted"] is True and written["key_bits"] == 0
        assert "could not be written" in written["abort_reason"]


def test_a_full_disk_in_simulate_is_one_line_exit_1_naming_the_directory(small_tmpfs, capsys):
    out = small_tmpfs / "pass"
    argv = ["simulate", "--profile", "jinan-1", "--duration-s", "1", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"qkdsat simulate: failed: --out {out}: No space left on device")
    assert "--force" in err and not (out / "pass.json").exists()


# ------------------------------------------------------------------ waits with deadlines


def _noise_pty():
    """A pty whose far end sends random bytes without end (a wrong baud rate): (port name,
    stop event, thread)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    stop = threading.Event()

    def noise():  # never a zero byte (a frame delimiter): no frame ever ends
        burst = np.random.default_rng(5).integers(1, 256, 4096, dtype=np.uint8).tobytes()
        os.set_blocking(master, False)
        while not stop.is_set():
            try:
                os.write(master, burst)
            except BlockingIOError:
                time.sleep(0.001)  # the line is full: the reader has bytes waiting
            except OSError:
                return

    thread = threading.Thread(target=noise, daemon=True)
    thread.start()
    return name, stop, thread, (master, slave)


def _ends_within(function, seconds: float):
    """Run function in a thread; (finished in time, its exception or result)."""
    outcome = {}

    def body():
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["value"] = error

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome.get("value")


def test_framed_serial_deadline_holds_on_a_noisy_line():
    from host.link.framed_serial import FramedSerial, LinkTimeout

    name, stop, thread, fds = _noise_pty()
    try:
        with FramedSerial(name) as link:
            ended, value = _ends_within(lambda: link.receive(0.3), 5.0)
            assert ended, "receive() ignored its deadline while bytes kept arriving"
            assert isinstance(value, LinkTimeout)
            assert link.bytes_received > 0  # the noise did arrive
    finally:
        stop.set()
        thread.join()
        for fd in fds:
            os.close(fd)


def test_a_port_that_goes_away_is_link_lost_not_a_traceback():
    from host.link.framed_serial import FramedSerial, LinkLost

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        with FramedSerial(os.ttyname(slave)) as link:
            os.close(master)  # the far end is gone (a USB adapter pulled out)
            master = None
            with pytest.raises(LinkLost, match="link lost"):
                link.receive(1.0)
    finally:
        if master is not None:
            os.close(master)
        os.close(slave)


def test_payload_on_a_noisy_line_ends_with_link_failed_exit_4(tmp_path, capsys):
    name, stop, thread, fds = _noise_pty()
    try:
        key = tmp_path / "link.key"  # the payload has no built-in key: a test key file
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        argv = ["payload", "--port", name, "--timeout", "0.5", "--key", str(key)]
        argv += ["--counter-file", str(tmp_path / "counter"), "ping"]
        ended, code = _ends_within(lambda: main(argv), 15.0)
        assert ended, "qkdsat payload hung on a noisy line"
        assert code == 4
        err = capsys.readouterr().err
        assert "link failed" in err and "Traceback" not in err
    finally:
        stop.set()
        thread.join()
        for fd in fds:
            os.close(fd)


@pytest.mark.slow
def test_flash_with_a_key_and_no_answer_is_one_line_exit_1(tmp_path, capsys):
    """No REPL and no answer to the maintenance telecommand (a board that is off): bounded
    waits (the 3 s REPL probe, then the ping, a read, sent 4 times with --timeout 0.5 s
    for each answer, ~5 s in all; 3 s each by default, ~15 s), then one line naming both
    failures and saying how long it waited."""
    key = tmp_path / "payload.key"
    key.write_text("ab" * 32)
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        argv = ["flash", "--port", os.ttyname(slave), "--key", str(key), "--timeout", "0.5"]
        ended, code = _ends_within(lambda: main(argv), 60.0)
        assert ended and code == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "maintenance telecommand failed" in err and "no answer" in err
        assert "to any of 4 sends, 0.5 s each" in err
    finally:
        os.close(master)
        os.close(slave)


def test_raw_repl_deadline_holds_on_a_noisy_line():
    from host.deploy.raw_repl import HARD_DEADLINE_FACTOR, RawRepl, RawReplError

    name, stop, thread, fds = _noise_pty()
    try:
        repl = RawRepl(name, timeout_s=0.3)
        try:
            budget_s = HARD_DEADLINE_FACTOR * 0.3 + 2.0
            ended, value = _ends_within(lambda: repl._read_until(b"never", 0.3), budget_s)
            assert ended, "the raw REPL wait ignored its deadline while bytes kept arriving"
            assert isinstance(value, RawReplError)
        finally:
            repl.close()
    finally:
        stop.set()
        thread.join()
        for fd in fds:
            os.close(fd)


@pytest.mark.slow  # ~7 s: the board below reads the program for longer than the old 5 s
def test_a_program_the_board_reads_slowly_is_still_run():
    """QEMU hands its UART the program one byte per turn of its main loop, at the host's
    pace: the raw REPL's "OK" (sent once the board has read the whole program) came more
    than 5 s after the write at load ~10, and a fixed 5 s wait for it failed 17 firmware
    tests in one run on netduino2. A board on a pty that reads a 2 kB program 64 bytes
    every 0.2 s (6.4 s) and then answers: exec returns its output."""
    from host.deploy.raw_repl import RawRepl

    master, slave = os.openpty()
    tty.setraw(slave)
    program = b"print('slow')\n" + b"#" * 2000 + b"\n"

    def board():
        received = b""
        while not received.endswith(b"\x04"):
            time.sleep(0.2)
            received += os.read(master, 64)
        assert received == program + b"\x04"
        os.write(master, b"OKslow\r\n\x04\x04>")

    thread = threading.Thread(target=board, daemon=True)
    thread.start()
    try:
        repl = RawRepl(os.ttyname(slave))
        try:
            started = time.monotonic()
            assert repl.exec(program, timeout_s=60).strip() == "slow"
            assert time.monotonic() - started > 6.0  # the board did take longer than 5 s
        finally:
            repl.close()
    finally:
        thread.join(10)
        os.close(master)
        os.close(slave)


def test_the_link_benchmarks_pty_baseline_never_blocks():
    """benchmarks/bench_link.py's baseline copies 4 MiB through a bare pty; a blocking
    write into a full pty buffer used to stall it for good (within 30 repetitions on this
    machine, often the first)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_link
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def thirty_copies():
        return [bench_link._pty_copy_rate(4 * 1024 * 1024) for _ in range(30)]

    ended, rates = _ends_within(thirty_copies, 60.0)
    assert ended, "the pty baseline blocked"
    assert not isinstance(rates, BaseException), rates
    assert min(rates) > 1e6  # bytes/s: every copy completed
