"""The bundle registry and the cache of loaded task models, on one shared frozen backbone.

Every sub-folder of a bundle folder that holds a bundle (``manifest.json``, or a run folder's ``bundle/``) is a
task named by the sub-folder. The folders are read again when a task is missing (a request for a name not seen
yet) and whenever the task list is asked for, and each request checks its bundle's manifest on disk, so a bundle
added, replaced or removed is served as it now is without a restart.

Loaded task models live in an LRU cache bounded by the bytes of their own tensors (prompts, VRM, heads, text
buffers; an instance encoder when a bundle has one), never the shared backbone, which is loaded once. A bundle
made for another backbone (weights fingerprint, image size or pooling) is refused with 409 naming both.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from ..bundle import MANIFEST, load_bundle, read_manifest, resolve_bundle
from ..errors import BundleError, ConfigError, PathoTuneError
from ..hub import is_hub_ref, parse_hub_ref
from ..inference import transforms
from ..model import PathoTuneModel
from ..multitask import backbone_recipe, describe_recipe
from .errors import RequestError
from .metrics import ServeMetrics

Stamp = tuple[int, int, int]  # (inode, mtime_ns, size) of a manifest: a replaced bundle gets a new one


@dataclass(frozen=True)
class Task:
    """A registered bundle: its manifest (checked), or why it cannot be served (``problem``)."""

    name: str
    path: Path
    stamp: Stamp
    manifest: dict | None
    problem: RequestError | None = None

    @property
    def sha256(self) -> str:
        """What identifies this version of the bundle: its manifest's checksum (format 1: the tensors')."""
        m = self.manifest or {}
        return str(m.get("manifest_sha256") or m.get("sha256") or "")

    def describe(self) -> dict:
        """What ``GET /v1/tasks`` says of the task: classes, backbone and fingerprint, the card's metrics."""
        if self.manifest is None:
            return {"name": self.name, "servable": False, "problem": str(self.problem)}
        m, prov = self.manifest, self.manifest["provenance"]
        extra = m.get("extra") if isinstance(m.get("extra"), dict) else {}
        out = {
            "name": self.name,
            "servable": self.problem is None,
            "classes": m["class_names"],
            "method": m["method"],
            "task_text": m.get("task_text", ""),
            "backbone": prov["backbone"],
            "fingerprint": prov["fingerprint"],
            "image_size": prov["image_size"],
            "metrics": extra.get("metrics") if isinstance(extra.get("metrics"), dict) else {},
            "bundle_sha256": self.sha256,
        }
        if self.problem is not None:
            out["problem"] = str(self.problem)
        return out


@dataclass(frozen=True, eq=False)
class Loaded:
    """A task's model on the shared backbone, and the bytes of its own tensors."""

    task: Task
    model: PathoTuneModel
    nbytes: int


def valid_name(name: str) -> bool:
    """A task name is one visible path component (it is looked up as a folder under each bundle folder)."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name


def _stamp(manifest: Path) -> Stamp | None:
    try:
        st = os.stat(manifest)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _bundle_in(folder: Path) -> Path | None:
    """The bundle a folder holds (itself, or a run folder's ``bundle/``), or None."""
    for candidate in (folder, folder / "bundle"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


class BundleStore:
    """Tasks by name, loaded on demand onto the backbone of the reference task (the first by name by default)."""

    def __init__(
        self,
        sources: Iterable[str],
        cache_bytes: int,
        metrics: ServeMetrics,
        weights: str | None = None,
        reference: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cache_bytes = cache_bytes
        self.metrics = metrics
        self.weights = weights
        self.device = torch.device(device)
        self.folders: list[Path] = []
        self.fixed: dict[str, Path] = {}  # single bundles given directly (local or hf-hub): never rescanned away
        self.tasks: dict[str, Task] = {}
        self.cache: OrderedDict[str, Loaded] = OrderedDict()
        self.cached_bytes = 0
        self.lock = threading.RLock()
        self.loading: dict[str, threading.Lock] = {}
        self._add_sources(sources)
        self.recipe: tuple | None = None
        self.rescan()
        if not self.tasks:
            shown = ", ".join(str(f) for f in self.folders)
            raise ConfigError(f"no bundles found in {shown}; put each bundle in a sub-folder (<folder>/<task>/)")
        name = reference or min(self.tasks)
        ref = self.tasks.get(name)
        if ref is None:
            raise ConfigError(f"--reference {name} is not a task here; the tasks are {', '.join(sorted(self.tasks))}")
        if ref.manifest is None:
            raise ConfigError(f"the reference task {name} cannot be read: {ref.problem}; fix it or pass --reference")
        model = load_bundle(ref.path, weights=weights)
        if model.switches.train in ("all", "lora"):
            raise ConfigError(f"the reference task {name} ({model.method}) changes the backbone; pass --reference")
        self.backbone = model.backbone.to(self.device).eval()
        self.transform = transforms(model)  # what `pathotune predict` applies to a decoded image
        self.recipe = backbone_recipe(ref.manifest)
        self.shared = {t.data_ptr() for t in chain(self.backbone.parameters(), self.backbone.buffers())}
        self.tasks = {n: self._check(t) for n, t in self.tasks.items()}  # now against the served backbone
        metrics.cache_limit.set(cache_bytes)
        first = Loaded(self.tasks[name], model.to(self.device).eval(), self._own_bytes(model))
        if first.nbytes <= cache_bytes:
            self._insert(first)

    # -- sources and registration ---------------------------------------------------------------------------------

    def _add_sources(self, sources: Iterable[str]) -> None:
        for src in sources:
            if is_hub_ref(src):
                self._add_fixed(parse_hub_ref(src, BundleError).repo_id.split("/")[-1], resolve_bundle(src), src)
                continue
            path = Path(src).expanduser()
            if not path.is_dir():
                raise ConfigError(f"--bundles {src} is not a folder; pass a folder of bundle folders or a bundle")
            bundle = _bundle_in(path)
            if bundle is not None:
                self._add_fixed(path.resolve().name, bundle, src)
            else:
                self.folders.append(path)

    def _add_fixed(self, name: str, path: Path, src: str) -> None:
        if name in self.fixed:
            raise ConfigError(
                f"--bundles {src} is a second task named '{name}'; serve it from a folder of another name"
            )
        self.fixed[name] = path

    def _find(self, name: str) -> Path | None:
        """Where the task ``name`` is now: a fixed bundle, else the first bundle folder that holds it."""
        if name in self.fixed:
            return self.fixed[name]
        for folder in self.folders:
            bundle = _bundle_in(folder / name)
            if bundle is not None:
                return bundle
        return None

    def _register(self, name: str, path: Path) -> Task | None:
        """The task as its bundle now is (re-read only when its manifest changed); None once it is gone."""
        stamp = _stamp(path / MANIFEST)
        if stamp is None:
            return None
        old = self.tasks.get(name)
        if old is not None and old.path == path and old.stamp == stamp:
            return old
        try:
            task = Task(name, path, stamp, read_manifest(path))
        except BundleError as e:
            task = Task(name, path, stamp, None, RequestError(503, f"task '{name}' cannot be served: {e}"))
        return self._check(task)

    def _check(self, task: Task) -> Task:
        """The task, with a 409 problem when its bundle needs another backbone than the one served."""
        if task.manifest is None or self.recipe is None:
            return task
        m = task.manifest
        if m["switches"].get("train") in ("all", "lora"):
            msg = f"task '{task.name}' ({m['method']}) changes the backbone, so it cannot share the served one"
            return Task(task.name, task.path, task.stamp, m, RequestError(409, msg))
        try:
            recipe = backbone_recipe(m)
        except (KeyError, TypeError, AttributeError):
            return Task(task.name, task.path, task.stamp, m, RequestError(503, f"task '{task.name}' is malformed"))
        if recipe != self.recipe:
            msg = (
                f"task '{task.name}' was trained on {describe_recipe(recipe)}, but this server runs "
                f"{describe_recipe(self.recipe)}; serve it from a server on its own backbone"
            )
            return Task(task.name, task.path, task.stamp, m, RequestError(409, msg))
        return task

    def _update(self, name: str, task: Task | None) -> None:
        if task is None:
            self.tasks.pop(name, None)
        else:
            self.tasks[name] = task
        cached = self.cache.get(name)
        if cached is not None and (task is None or cached.task.stamp != task.stamp or cached.task.path != task.path):
            self._evict(name)

    def rescan(self) -> list[Task]:
        """Read the folders again (new, changed and removed bundles); every task, sorted by name.

        Files are read outside the lock, so that a long rescan never holds up a request on the event loop."""
        found: dict[str, Path] = {}
        for folder in reversed(self.folders):  # the first folder holding a name wins
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if valid_name(entry.name) and entry.is_dir():
                    bundle = _bundle_in(Path(entry.path))
                    if bundle is not None:
                        found[entry.name] = bundle
        found.update(self.fixed)
        fresh = {name: self._register(name, path) for name, path in found.items()}
        with self.lock:
            for name in set(self.tasks) - set(fresh):
                self._update(name, None)
            for name, task in fresh.items():
                self._update(name, task)
            self.metrics.registered.set(len(self.tasks))
            return [self.tasks[n] for n in sorted(self.tasks)]

    def task(self, name: str) -> Task:
        """The servable task ``name`` as its bundle now is: 404 when there is none, its problem (409, 503) if any."""
        if not valid_name(name):
            raise RequestError(404, f"no task '{name}'; GET /v1/tasks lists the tasks")
        path = self._find(name)
        task = None if path is None else self._register(name, path)
        with self.lock:
            self._update(name, task)
            self.metrics.registered.set(len(self.tasks))
        if task is None:
            raise RequestError(404, f"no task '{name}'; GET /v1/tasks lists the tasks")
        if task.problem is not None:
            raise task.problem
        return task

    # -- the cache of loaded models -------------------------------------------------------------------------------

    def cached(self, task: Task) -> Loaded | None:
        """The task's model if it is in the cache (never blocks on a load: the event loop may call it)."""
        with self.lock:
            return self._hit(task)

    def model(self, task: Task) -> Loaded:
        """The task's model, from the cache or loaded now (blocking: call it from a worker thread)."""
        with self.lock:
            hit = self._hit(task)
            if hit is not None:
                return hit
            gate = self.loading.setdefault(task.name, threading.Lock())
        with gate:  # one load per task at a time; a second caller finds it cached
            with self.lock:
                hit = self._hit(task)
                if hit is not None:
                    return hit
            try:
                model = load_bundle(task.path, weights=self.weights, backbone_module=self.backbone)
            except PathoTuneError as e:
                raise RequestError(503, f"task '{task.name}' cannot be loaded: {e}") from None
            model = model.to(self.device).eval()
            loaded = Loaded(task, model, self._own_bytes(model))
            if loaded.nbytes > self.cache_bytes:
                raise RequestError(
                    507,
                    f"task '{task.name}' needs {loaded.nbytes:,} bytes, more than the whole bundle cache "
                    f"({self.cache_bytes:,} bytes, --cache-mb); restart the server with a larger cache",
                )
            with self.lock:
                self.metrics.cache_misses.inc()
                self._insert(loaded)
                self.loading.pop(task.name, None)
            return loaded

    def _hit(self, task: Task) -> Loaded | None:
        cached = self.cache.get(task.name)
        if cached is None or cached.task.stamp != task.stamp or cached.task.path != task.path:
            return None
        self.cache.move_to_end(task.name)
        self.metrics.cache_hits.inc()
        return cached

    def _insert(self, loaded: Loaded) -> None:
        name = loaded.task.name
        if name in self.cache:
            self._evict(name)
        while self.cache and self.cached_bytes + loaded.nbytes > self.cache_bytes:
            self._evict(next(iter(self.cache)))
        self.cache[name] = loaded
        self.cached_bytes += loaded.nbytes
        self._gauges()

    def _evict(self, name: str) -> None:
        gone = self.cache.pop(name)
        self.cached_bytes -= gone.nbytes
        self.metrics.cache_evictions.inc()
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.cache_bytes.set(self.cached_bytes)
        self.metrics.cache_tasks.set(len(self.cache))

    def _own_bytes(self, model: PathoTuneModel) -> int:
        """Bytes of the model's tensors that are not the shared backbone's (each storage counted once)."""
        seen: set[int] = set()
        total = 0
        for t in chain(model.parameters(), model.buffers()):
            ptr = t.data_ptr()
            if ptr in self.shared or ptr in seen:
                continue
            seen.add(ptr)
            total += t.numel() * t.element_size()
        return total

    def describe_backbone(self) -> dict:
        """The served backbone, as ``GET /v1/tasks`` reports it."""
        backbone, _, image_size, pool = self.recipe  # type: ignore[misc]
        fingerprint = self.backbone.fingerprint
        return {"backbone": backbone, "fingerprint": fingerprint, "image_size": image_size, "pool": pool}
