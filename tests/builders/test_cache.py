"""`pkg cache`: the build caches listed and pruned, least recently used first; what a build still needs stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bento_like.models as models
from bento_like.builders.cache import GRACE_S, entries, prune
from bento_like.builders.oci import ImageConfig, LayerSpec, build_image
from bento_like.builders.optimize import PassCache

DAY = 86400.0


def _layer_dirs(tmp_path: Path) -> list[Path]:
    dirs = []
    for name, size in (("old", 30_000), ("middle", 20_000), ("fresh", 10_000)):
        d = tmp_path / name
        d.mkdir()
        (d / "data.bin").write_bytes(os.urandom(size))  # random: gzip keeps the sizes apart
        dirs.append(d)
    return dirs


def _build(dirs: list[Path], out: Path, cache: Path):  # type: ignore[no-untyped-def]
    specs = [LayerSpec.directory(d, f"/srv/{d.name}", comment=d.name) for d in dirs]
    return build_image(None, specs, ImageConfig(user=None), out, "v1", cache_dir=cache)


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_prune_goes_least_recently_used_first_and_the_next_build_rebuilds_only_what_went(home: Path, tmp_path: Path) -> None:
    cache = home / "cache" / "oci" / "layers"  # where `pkg containerize` keeps them
    dirs = _layer_dirs(tmp_path)
    first = _build(dirs, tmp_path / "out1", cache)
    assert [layer.source for layer in first.layers] == ["built"] * 3
    layers = {e.key: e for e in entries() if e.kind == "layer"}
    assert len(layers) == 3 and all(len(e.paths) == 2 and all(p.exists() for p in e.paths) for e in layers.values())
    by_name = {}
    for result, d in zip(first.layers, dirs):
        entry = next(e for e in layers.values() if e.paths[1].name == result.digest.split(":")[1])
        by_name[d.name] = entry
    _age(by_name["old"].paths[0], 3 * DAY)
    _age(by_name["middle"].paths[0], 2 * DAY)
    _age(by_name["fresh"].paths[0], 2 * GRACE_S)

    dry = prune(older_than=1.5 * DAY, dry_run=True)
    assert {e.key for e in dry.removed} == {by_name["old"].key, by_name["middle"].key}
    assert all(p.exists() for e in dry.removed for p in e.paths), "a dry run removes nothing"

    # Room for two layers: the least recently used one goes, however big the others are.
    limit = by_name["middle"].size + by_name["fresh"].size
    report = prune(max_size=limit)
    assert [e.key for e in report.removed] == [by_name["old"].key] and report.remaining <= limit
    assert not any(p.exists() for p in by_name["old"].paths)

    again = _build(dirs, tmp_path / "out2", cache)
    assert [layer.source for layer in again.layers] == ["built", "cached", "cached"]
    assert again.manifest_digest == first.manifest_digest
    fresh_record = by_name["fresh"].paths[0]
    assert time.time() - fresh_record.stat().st_mtime < 60, "a layer taken from the cache is marked used"


def test_recent_entries_and_running_builds_stay_dead_builds_leftovers_go(home: Path) -> None:
    oci = home / "cache" / "oci"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = {
        "live": oci / "runtime" / f"build-{os.getpid()}",
        "dead": oci / "runtime" / f"build-{dead.pid}",
        "partial": oci / "site-packages" / f"abc.partial-{dead.pid}",
    }
    for path in leftovers.values():
        path.mkdir(parents=True)
        (path / "f").write_bytes(b"x" * 1000)
        _age(path, 2 * GRACE_S)
    installed = oci / "site-packages" / "k1"
    installed.mkdir()
    (installed / "pkg.py").write_text("x = 1\n")
    (installed / ".complete").write_text("")  # just used: within the grace period

    def save(store: models.ModelStore) -> str:
        return store.save("blob", [1, 2, 3], framework="pickle")

    optimized = PassCache().put("k2", "blob", save)
    _age(optimized.path / "entry.json", 40 * DAY)
    kinds = {e.kind for e in entries()}
    assert {"leftover", "site-packages", "optimize"} <= kinds

    report = prune(max_size=0)
    removed = {p for e in report.removed for p in e.paths}
    assert leftovers["dead"] in removed and leftovers["partial"] in removed and optimized.path in removed
    assert leftovers["live"].exists(), "a running build's own directory stays"
    assert installed.exists(), "an entry used within the grace period stays"
    assert PassCache().get("k2") is None, "a pruned pass result is a cache miss, not an error"


def test_pkg_cache_list_and_prune(home: Path) -> None:
    lock = home / "cache" / "locks" / "abc.json"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"text": "", "packages": []}))
    _age(lock, 10 * DAY)
    env = {**os.environ, "BENTO_LIKE_HOME": str(home)}

    def pkg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bento_like", "cache", *args], capture_output=True, text=True,
                              env=env, cwd=home)

    listed = pkg("list")
    assert listed.returncode == 0 and "lock" in listed.stdout and "10d ago" in listed.stdout, listed.stdout
    dry = pkg("prune", "--older-than", "7d", "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    assert [e["key"] for e in json.loads(dry.stdout)["removed"]] == ["abc"] and lock.exists()
    done = pkg("prune", "--older-than", "7d")
    assert done.returncode == 0 and "removed lock abc" in done.stdout and not lock.exists(), done.stdout
    bad = pkg("prune", "--max-size", "lots")
    assert bad.returncode == 2 and "--max-size" in bad.stderr and "500MB" in bad.stderr, bad.stderr
