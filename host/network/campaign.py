"""Campaigns: every scheduled pass of N days simulated and distilled on dask.distributed,
the keys filled into the network's pools, key per station per day, relay capacity and
pool levels over time reported and plotted (docs/network.md, `qkdsat campaign`).

Layout of a campaign directory OUT:
  campaign.json          the plan: inputs, schedule policy, one spec per pass (no secret)
  campaign.secret        32 bytes from the OS, 0600: each pass's pattern secret is a keyed
                         hash of it and the pass id (the emulated head's QRNG stand-in;
                         reruns and other worker counts simulate the same photons)
  attempts.jsonl         one line per task start (pass id, pid, host): the audit that a
                         resumed campaign redid no finished pass
  passes/ID/             a finished pass, renamed into place in one step from a private
                         temporary directory: pass/pass.json, keys/ (the distillation's
                         report.json and, when it made a key, alice.key and bob.key, 0600),
                         result.json (summary, no key material)
  network/               the pools (unless --network names another directory)
  report.json, key-per-station.png, pool-levels.png

A pass is one task. It reads only its spec and the campaign secret, writes only its own
temporary directory, and returns a summary: no key crosses the Dask network. A killed
campaign resumes from the finished passes: a pass is finished exactly when its directory
exists (the rename is the commit point), so a pass is never half-counted nor redone.
The pools are filled by the driver alone, in rise-time order, after the passes are done:
the same offsets whatever the number of workers, and a fill already in a pool is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import socket
import sys
from datetime import datetime, timedelta
from pathlib import Path

from host.distil.durable import fsync_directory, write_atomic
from host.errors import BadInput, EnvironmentFailure

CAMPAIGN_FORMAT_VERSION = 1
SECRET_BYTES = 32
SIMULATION_LEAD_S = 30.0  # the simulator searches the TLE pass from this long before rise
RESULT_NAME = "result.json"
# what a pass result keeps of the distillation's report.json (no key material in any)
REPORT_FIELDS = ("aborted", "abort_reason", "key_bits", "sifted_bits", "qber", "counts")
_STATION_FIELDS = ("lat_deg", "lon_deg", "alt_m", "aperture_diameter_m", "elevation_mask_deg")


# ------------------------------------------------------------------ the plan


def pass_id(item: dict) -> str:
    rise = item["rise_utc"].replace("-", "").replace(":", "").split(".")[0]
    return f"{item['station']}-{rise}Z"


def plan_campaign(
    tle_text: str,
    tle_origin: str,
    station_names: list[str],
    start: datetime,
    days: float,
    profile: str,
    duration_s: float | None,
    overrides: list[str],
    catalogue_path=None,
    seed: int = 1,
    ec: str = "ldpc",
    insecure_distil_seed: int | None = None,
) -> dict:
    """The schedule's passes as task specs (everything a task needs but the secret)."""
    from host.network.schedule import SCHEDULED, make_schedule
    from host.network.stations import CATALOGUE_PATH, load_catalogue, select_stations
    from host.simulate import profiles

    catalogue = load_catalogue(catalogue_path)
    stations = select_stations(station_names, catalogue)
    profiles.load(profile, dict(profiles.parse_override(text) for text in overrides))
    raw_catalogue = json.loads(Path(catalogue_path or CATALOGUE_PATH).read_text())["stations"]
    schedule = make_schedule(tle_text, stations, start, days, tle_origin)
    specs = []
    for item in schedule["passes"]:
        if item["status"] != SCHEDULED:
            continue
        identifier = pass_id(item)
        rise = datetime.fromisoformat(item["rise_utc"].replace("Z", "+00:00"))
        sim_start = rise - timedelta(seconds=SIMULATION_LEAD_S)
        specs.append(
            {
                "id": identifier,
                "station": item["station"],
                "station_entry": {k: raw_catalogue[item["station"]][k] for k in _STATION_FIELDS},
                "rise_utc": item["rise_utc"],
                "culmination_utc": item["culmination_utc"],
                "set_utc": item["set_utc"],
                "duration_s": item["duration_s"],
                "max_elevation_deg": item["max_elevation_deg"],
                "simulation_start_utc": sim_start.isoformat().replace("+00:00", "Z"),
                # a public simulation seed per pass (channel noise); never the pattern secret
                "seed": _derived_seed(f"{seed}:{identifier}", 4),
                "tle": tle_text,
                "profile": profile,
                "overrides": list(overrides),
                "segment_s": duration_s,
                "ec": ec,
                # tests only: the distillation's randomness replayed (its keys are refused
                # by the pools); None: the OS's CSPRNG, as for every real key
                "insecure_distil_seed": None
                if insecure_distil_seed is None
                else _derived_seed(f"{insecure_distil_seed}:{identifier}", 8) >> 1,
            }
        )
    return {
        "format_version": CAMPAIGN_FORMAT_VERSION,
        "inputs": {
            "tle_sha256": hashlib.sha256(tle_text.encode()).hexdigest(),
            "stations": [station.name for station in stations],
            "start_utc": schedule["start_utc"],
            "days": days,
            "profile": profile,
            "overrides": list(overrides),
            "segment_s": duration_s,
            "seed": seed,
            "ec": ec,
            "insecure_distil_seed": insecure_distil_seed,
        },
        "satellite": schedule["satellite"],
        "policy": schedule["policy"],
        "passes": specs,
    }


def _derived_seed(text: str, size_bytes: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:size_bytes], "little")


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """The one durable writer (host/distil/durable.py); its temporary is named apart per
    call too, not only per process."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    write_atomic(path, data, mode, tmp)


def _json_bytes(data) -> bytes:
    from host.console import to_json

    return (to_json(data) + "\n").encode()


def prepare(out: Path, plan: dict) -> None:
    """Write the plan and the secret of a new campaign, or check that OUT holds this one."""
    plan_path = out / "campaign.json"
    if plan_path.exists():
        try:
            existing = json.loads(plan_path.read_text())
        except ValueError as error:
            raise BadInput(f"{plan_path}: not JSON ({error})") from None
        if existing.get("inputs") != plan["inputs"]:
            changed = sorted(
                key
                for key in set(plan["inputs"]) | set(existing.get("inputs", {}))
                if plan["inputs"].get(key) != existing.get("inputs", {}).get(key)
            )
            raise BadInput(
                f"--out {out}: holds another campaign (different {', '.join(changed)}); "
                "resume it with the same options or give a new --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(plan_path, _json_bytes(plan))
    (out / "passes").mkdir(exist_ok=True)
    secret_path = out / "campaign.secret"
    if not secret_path.exists():
        _write_atomic(secret_path, secrets.token_bytes(SECRET_BYTES), 0o600)
    if secret_path.stat().st_mode & 0o077:
        raise BadInput(f"{secret_path}: readable by group or others; chmod 600 {secret_path}")
    for stale in (out / "passes").glob(".*.tmp"):  # a killed run's unfinished passes
        shutil.rmtree(stale, ignore_errors=True)


def finished(out: Path, spec: dict) -> dict | None:
    path = out / "passes" / spec["id"] / RESULT_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


# ------------------------------------------------------------------ one pass (a task)


def _pattern_secret(out: Path, identifier: str) -> str:
    secret = (out / "campaign.secret").read_bytes()
    return hmac.new(secret, f"pattern:{identifier}".encode(), hashlib.sha256).hexdigest()[:32]


def _record_attempt(out: Path, identifier: str) -> None:
    line = json.dumps({"pass": identifier, "pid": os.getpid(), "host": socket.gethostname()})
    fd = os.open(out / "attempts.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write of one short line: atomic append
    finally:
        os.close(fd)


def run_pass(campaign_dir: str, spec: dict) -> dict:
    """Simulate and distil one pass (`qkdsat simulate`, `qkdsat distil`) in a private
    temporary directory, then rename it into place. Returns the pass's summary."""
    from host.cli import main as qkdsat
    from host.simulate import profiles

    out = Path(campaign_dir)
    final = out / "passes" / spec["id"]
    done = finished(out, spec)
    if done is not None:  # a task retried after its first run had finished
        return done
    _record_attempt(out, spec["id"])
    work = out / "passes" / f".{spec['id']}.{secrets.token_hex(4)}.tmp"
    work.mkdir()
    try:
        raw_profile = json.loads(profiles.resolve(spec["profile"]).read_text())
        raw_profile.setdefault("stations", {})[spec["station"]] = spec["station_entry"]
        (work / "profile.json").write_text(json.dumps(raw_profile))
        (work / "satellite.tle").write_text(spec["tle"])
        simulate = ["simulate", "--quiet", "--profile", str(work / "profile.json"),
                    "--tle", str(work / "satellite.tle"), "--station", spec["station"],
                    "--start", spec["simulation_start_utc"], "--seed", str(spec["seed"]),
                    "--pattern-secret", _pattern_secret(out, spec["id"]),
                    "--out", str(work / "pass")]  # fmt: skip
        if spec["segment_s"] is not None:
            simulate += ["--duration-s", str(spec["segment_s"])]
        for text in spec["overrides"]:
            simulate += ["--set", text]
        distil = ["distil", "--quiet", str(work / "pass"), "--out", str(work / "keys"),
                  "--ec", spec["ec"]]  # fmt: skip
        if spec["insecure_distil_seed"] is not None:
            distil += ["--insecure-deterministic-seed", str(spec["insecure_distil_seed"])]
        # The commands' one-line messages (a distillation aborted by design is a result,
        # not an error) go into the pass's failure, not onto the campaign's terminal.
        for command, allowed in ((simulate, (0,)), (distil, (0, 3))):
            messages = io.StringIO()
            with contextlib.redirect_stderr(messages):
                code = qkdsat(command)
            if code not in allowed:  # 3: aborted by design (too few events, QBER): no key
                last = (messages.getvalue().strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"qkdsat {command[0]} exited {code}: {last}")
        report = json.loads((work / "keys" / "report.json").read_text())
        # Keep pass.json (its SHA-256 names the pass in the pools); the detections, the
        # pattern and the truth are large and the pattern is Alice's secret: dropped.
        for name in ("satellite", "ground", "truth"):
            shutil.rmtree(work / "pass" / name, ignore_errors=True)
        (work / "profile.json").unlink()
        result = {
            "id": spec["id"],
            "station": spec["station"],
            "culmination_utc": spec["culmination_utc"],
            "detections": (report.get("sync") or {}).get("detections"),
            **{field: report.get(field) for field in REPORT_FIELDS},
            "deterministic_randomness": bool(report.get("deterministic_randomness")),
        }
        _write_atomic(work / RESULT_NAME, _json_bytes(result))
        fsync_directory(work)
        try:
            os.rename(work, final)  # the commit point of the pass
        except OSError:
            if finished(out, spec) is None:
                raise
            shutil.rmtree(work, ignore_errors=True)  # a duplicate run finished first
            return finished(out, spec)
        fsync_directory(final.parent)
        return result
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# ------------------------------------------------------------------ running on Dask


def _client(scheduler: str | None, workers: int):
    """(client, cluster or None): a LocalCluster of `workers` processes (one thread
    each: the distillation's endpoints already use threads) or the cluster at an
    address."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="5s"), None
        except (OSError, TimeoutError) as error:
            raise BadInput(
                f"--scheduler {scheduler}: no Dask scheduler answers ({error})"
            ) from None
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,  # errors only: the progress bar is the campaign's output
    )
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def run_passes(out: Path, specs: list[dict], scheduler, workers: int, progress: bool) -> dict:
    """Run the unfinished passes; {id: error message} for those that failed."""
    from dask.distributed import as_completed
    from tqdm import tqdm

    todo = [spec for spec in specs if finished(out, spec) is None]
    failures = {}
    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        unit="pass",
        desc="qkdsat campaign",
        disable=not progress,
        file=sys.stderr,
    )
    if not todo:
        bar.close()
        return failures
    client, cluster = _client(scheduler, workers)
    try:
        futures = {}
        for spec in todo:
            future = client.submit(
                run_pass, str(out.resolve()), spec, key=f"qkdsat-pass-{spec['id']}", pure=False
            )
            futures[future] = spec["id"]
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as error:  # the pass stays unfinished; a rerun retries it
                failures[futures[future]] = f"{type(error).__name__}: {error}"
            bar.update(1)
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return failures


# ------------------------------------------------------------------ pools and report


def fill_pools(out: Path, network: Path, results: list[dict]) -> list[dict]:
    """Fill every key made into the station's and the satellite's pools, in rise order;
    returns the pool level after each pass (bytes per station pair)."""
    from host.network.pool import (
        SATELLITE,
        StationPool,
        fill_pair,
        pool_path,
        read_distilled_key,
    )
    from host.network.relay import AUTH_BYTES

    timeline = []
    levels, for_relays = {}, {}
    for result in results:
        station = result["station"]
        keys = out / "passes" / result["id"] / "keys"
        if not result["aborted"] and not result["deterministic_randomness"]:
            _, source = read_distilled_key(keys, "bob")
            present = []
            for holder, peer in ((SATELLITE, station), (station, SATELLITE)):
                path = pool_path(network, holder, peer)
                if path.exists():
                    with StationPool(path) as pool:
                        present.append(source in pool.sources)
                else:
                    present.append(False)
            if not all(present):
                fill_pair(network, station, keys)
        path = pool_path(network, station, SATELLITE)
        if path.exists():
            with StationPool(path) as pool:
                levels[station] = pool.available_bytes
                for_relays[station] = pool.available_for(SATELLITE)  # a relay's share
        available_bits = {k: 8 * v for k, v in sorted(levels.items())}
        # a station's pool and the satellite's pool for it are filled alike: the relay
        # between two stations is bounded by the smaller of the satellite's shares of
        # their pools, less one tag
        names = sorted(for_relays)
        relay_bits = {
            f"{first}-{second}": 8
            * max(min(for_relays[first], for_relays[second]) - AUTH_BYTES, 0)
            for i, first in enumerate(names)
            for second in names[i + 1 :]
        }
        timeline.append(
            {
                "utc": result["culmination_utc"],
                "pass": result["id"],
                "available_bits": available_bits,
                "relay_capacity_bits": relay_bits,
            }
        )
    return timeline


def relay_capacity_bits(network: Path, stations: list[str]) -> dict:
    """Per pair of stations, the largest relay the four pools allow now (a relay of N
    bits takes N + 128 bits of each; relay.py)."""
    from host.network.pool import SATELLITE, StationPool, pool_path
    from host.network.relay import AUTH_BYTES

    def available(holder, peer) -> int:
        path = pool_path(network, holder, peer)
        if not path.exists():
            return 0
        with StationPool(path) as pool:
            return pool.available_for(SATELLITE)  # a relay takes the satellite's share

    capacity = {}
    for i, first in enumerate(stations):
        for second in stations[i + 1 :]:
            least = min(
                available(SATELLITE, first), available(first, SATELLITE),
                available(SATELLITE, second), available(second, SATELLITE),
            )  # fmt: skip
            capacity[f"{first}-{second}"] = 8 * max(least - AUTH_BYTES, 0)
    return capacity


def summarise(plan: dict, results: list[dict], timeline: list[dict], network: Path) -> dict:
    stations = plan["inputs"]["stations"]
    days = plan["inputs"]["days"]
    per_station = {}
    for station in stations:
        mine = [r for r in results if r["station"] == station]
        key_bits = sum(r["key_bits"] or 0 for r in mine)
        per_station[station] = {
            "passes": len(mine),
            "passes_with_key": sum(not r["aborted"] for r in mine),
            "key_bits": key_bits,
            "key_bits_per_day": key_bits / days,
        }
    return {
        "format_version": CAMPAIGN_FORMAT_VERSION,
        "inputs": plan["inputs"],
        "passes": results,
        "stations": per_station,
        "relay_capacity_bits": relay_capacity_bits(network, stations),
        "pool_levels": timeline,
    }


def plot(out: Path, summary: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stations = list(summary["stations"])
    figure, axes = plt.subplots(figsize=(7, 3.5))
    axes.bar(stations, [summary["stations"][s]["key_bits_per_day"] / 1e3 for s in stations])
    axes.set_ylabel("secret key (kbit / day)")
    axes.set_title("key per station per day")
    figure.autofmt_xdate(rotation=30)
    figure.tight_layout()
    figure.savefig(out / "key-per-station.png", dpi=100)
    plt.close(figure)
    written.append(str(out / "key-per-station.png"))

    figure, axes = plt.subplots(figsize=(7, 3.5))
    times = [
        datetime.fromisoformat(p["utc"].replace("Z", "+00:00")) for p in summary["pool_levels"]
    ]
    for station in stations:
        levels = [p["available_bits"].get(station, 0) / 1e3 for p in summary["pool_levels"]]
        axes.step(times, levels, where="post", label=station)
    axes.set_ylabel("station pool (kbit available)")
    axes.set_title("pool levels over the campaign")
    axes.legend(fontsize="small")
    figure.autofmt_xdate(rotation=30)
    figure.tight_layout()
    figure.savefig(out / "pool-levels.png", dpi=100)
    plt.close(figure)
    written.append(str(out / "pool-levels.png"))
    return written


def run_campaign(
    out: Path, plan: dict, network: Path, scheduler, workers: int, progress: bool
) -> dict:
    prepare(out, plan)
    specs = plan["passes"]
    failures = run_passes(out, specs, scheduler, workers, progress)
    if failures:
        names = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items())[:3])
        names += "; ..." if len(failures) > 3 else ""
        raise EnvironmentFailure(
            f"{len(failures)} of {len(specs)} passes failed ({names}); the others are kept: "
            "run the same command again to retry only these"
        )
    results = [finished(out, spec) for spec in specs]
    with contextlib.suppress(FileExistsError):
        network.mkdir(parents=True)
    timeline = fill_pools(out, network, results)
    summary = summarise(plan, results, timeline, network)
    summary["plots"] = plot(out, summary)
    _write_atomic(out / "report.json", _json_bytes(summary))
    return summary
