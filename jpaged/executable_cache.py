"""Compiled step programs kept on disk, so that a warm start loads them without tracing.

JAX's persistent compilation cache skips XLA's compile, but finding an entry needs the
program's HLO, so every start still traces and lowers each step program (the forward is ~0.5 s
of Python per bucket on a 2-core CPU: most of a warm start). This cache stores the executables
themselves (`jax.experimental.serialize_executable`), under a key computed without tracing:

- the program's name and static shape key (e.g. "forward", (num_tokens, num_seqs, pages_per_seq,
  decode_only));
- what the runner builds its programs from (`describe` of the jitted functions, their closures
  and jit options, the model config, the avals and shardings of params and KV pool);
- the source files of every package those functions and classes come from (jpaged's and
  pallas_kernels' included; installed distributions by their version), jax and jaxlib versions,
  jax's config values, the devices (platform, version, kind), the CPU's flags and the XLA_*,
  JAX_* and JPAGED_* environment variables.

Anything `describe` cannot pin down (an object without a value-based description) disables the
cache for that runner rather than risk a stale program. A file that fails to load is traced and
compiled again and overwritten. Only programs XLA really compiled are stored: one that JAX loaded
from its persistent compilation cache serializes without part of its code on XLA:CPU (jax 0.10.2:
"Function bitcast_gather_fusion not found" when run). The runner names its jitted functions
after the fingerprint, so JAX's cache holds a program under this fingerprint only if an earlier
start compiled (and stored) it; `ExecutableCache.compile` still stores nothing when JAX's cache
answered. Loading an executable runs code from the file: the folder must be as trusted as JAX's
own compilation cache, which it sits in.
"""

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import sys
import threading
import types
import zlib

import jax
import jaxlib
import numpy as np
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from jpaged.cpu_features import cpu_flags

logger = logging.getLogger(__name__)

_ENV_PREFIXES = ("XLA_", "JAX_", "JPAGED_")
_SOURCE_SUFFIXES = (".py", ".cc", ".h")
_MAX_CAPTURED_ARRAY_BYTES = 1 << 20
# The folder's size above which the least recently used files go, down to half of it (every
# code change or engine setting adds a set of programs: ~2-3 MB for the default model).
MAX_CACHE_BYTES = 1 << 30
_SCALAR_TYPES = (type(None), bool, int, float, complex, str, bytes)
_JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_jax_cache_hits = threading.local()  # .count: JAX persistent-cache hits in this thread
_hit_listener_lock = threading.Lock()
_hit_listener_registered = False


class Unfingerprintable(TypeError):
    """An object a program is built from has no value-based description."""


def describe(obj) -> tuple[str, frozenset[str]]:
    """A deterministic text for `obj`, equal for objects that trace to the same program, and
    the top-level modules of the functions and classes in it (whose sources the key covers).

    Handles scalars, enums, dtypes, containers, dataclasses (Flax modules too), functions
    (by module and qualified name, plus defaults and closed-over values), partials, bound
    methods, wrappers with `__wrapped__` (jax.jit's: their options are in their source), jax
    meshes, shardings and ShapeDtypeStructs, and small arrays (by content). Raises
    Unfingerprintable for anything else."""
    modules: set[str] = set()
    return _describe(obj, modules, ()), frozenset(modules)


def _describe(obj, modules: set[str], stack: tuple) -> str:
    if isinstance(obj, _SCALAR_TYPES) or isinstance(obj, enum.Enum):
        return repr(obj)
    if isinstance(obj, np.dtype):
        return f"dtype({obj})"
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        module = getattr(obj, "__module__", None) or "builtins"
        modules.add(module.split(".")[0])
        name = f"{module}.{obj.__qualname__}"
        if not isinstance(obj, types.FunctionType):
            return name
    if any(obj is seen for seen in stack):
        return "<cycle>"
    stack = (*stack, obj)

    def recurse(value):
        return _describe(value, modules, stack)

    if isinstance(obj, types.FunctionType):
        cells = [recurse(cell.cell_contents) for cell in obj.__closure__ or ()]
        return (f"{name}(defaults={recurse(obj.__defaults__)}, kwdefaults={recurse(obj.__kwdefaults__)}, "
                f"closure={cells})")
    if isinstance(obj, functools.partial):
        return f"partial({recurse(obj.func)}, {recurse(obj.args)}, {recurse(obj.keywords)})"
    if isinstance(obj, types.MethodType):
        return f"method({recurse(obj.__func__)}, {recurse(obj.__self__)})"
    if isinstance(obj, jax.ShapeDtypeStruct):
        return f"aval({obj.shape}, {obj.dtype}, {recurse(obj.sharding)})"
    if isinstance(obj, (jax.sharding.Sharding, jax.sharding.Mesh, jax.sharding.PartitionSpec)):
        return repr(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        if obj.nbytes > _MAX_CAPTURED_ARRAY_BYTES:
            raise Unfingerprintable(f"a captured array of {obj.nbytes} bytes")
        data = np.asarray(obj)
        return f"array({data.shape}, {data.dtype}, {hashlib.sha256(data.tobytes()).hexdigest()})"
    if isinstance(obj, (np.generic,)):
        return f"{type(obj).__name__}({obj!r})"
    if isinstance(obj, (list, tuple)):
        return f"{recurse(type(obj))}[{', '.join(map(recurse, obj))}]"
    if isinstance(obj, (set, frozenset)):
        return f"{recurse(type(obj))}{{{', '.join(sorted(map(recurse, obj)))}}}"
    if isinstance(obj, dict):
        items = sorted(f"{recurse(k)}: {recurse(v)}" for k, v in obj.items())
        return f"{recurse(type(obj))}{{{', '.join(items)}}}"
    if dataclasses.is_dataclass(obj):
        # A Flax module's `parent` is its place in a tree being built: not part of what it computes.
        fields = [f"{f.name}={recurse(getattr(obj, f.name))}" for f in dataclasses.fields(obj) if f.name != "parent"]
        return f"{recurse(type(obj))}({', '.join(fields)})"
    if callable(obj) and hasattr(obj, "__wrapped__"):  # a jax.jit or functools.wraps wrapper
        return f"{recurse(type(obj))}({recurse(obj.__wrapped__)})"
    raise Unfingerprintable(f"no value-based description of a {type(obj).__module__}.{type(obj).__qualname__}")


def avals(tree) -> tuple:
    """The structure, shapes, dtypes and shardings of a pytree of arrays (or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree.flatten(tree)
    return str(treedef), [(tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None))) for x in leaves]


@functools.cache
def _package_identity(top_level: str) -> str:
    """An installed distribution's name and version, or a hash of a package's source files."""
    module = sys.modules.get(top_level)
    path = getattr(module, "__file__", None)
    if path is None:  # built in, or a namespace package
        return f"{top_level} (no file)"
    if top_level not in ("jpaged", "pallas_kernels"):
        distributions = importlib.metadata.packages_distributions().get(top_level)
        if distributions and "site-packages" in path:
            return f"{top_level} {distributions[0]}=={importlib.metadata.version(distributions[0])}"
    digest = hashlib.sha256()
    root = os.path.dirname(path) if os.path.basename(path) == "__init__.py" else None
    files = [path] if root is None else sorted(
        os.path.join(folder, name) for folder, dirs, names in os.walk(root)
        if "__pycache__" not in folder for name in names if name.endswith(_SOURCE_SUFFIXES))
    for file in files:
        digest.update(os.path.relpath(file, root or os.path.dirname(path)).encode())
        with open(file, "rb") as f:
            digest.update(f.read())
    return f"{top_level} sources {digest.hexdigest()}"


def fingerprint(parts, devices) -> str:
    """The hash of `parts` (what the programs are built from; see `describe`) and of the
    environment they compile in, for the programs of one runner on `devices`. Raises
    Unfingerprintable when `parts` holds something `describe` cannot pin down."""
    text, modules = describe(parts)
    config = {name: value for name, value in jax.config.values.items()
              if isinstance(value, _SCALAR_TYPES) or isinstance(value, enum.Enum)}
    environment = [
        jax.__version__, jaxlib.__version__, sorted(map(_package_identity, modules | {"jpaged", "pallas_kernels"})),
        sorted((name, repr(value)) for name, value in config.items()),
        [(d.platform, d.client.platform_version, d.device_kind, d.id) for d in devices],
        sorted(cpu_flags()), sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)),
    ]
    return hashlib.sha256(f"{text}\n{environment!r}".encode()).hexdigest()


def _count_jax_cache_hit(event: str, **kwargs) -> None:
    if event == _JAX_CACHE_HIT_EVENT:  # recorded in the thread that compiles
        _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1


def _listen_for_jax_cache_hits() -> None:
    global _hit_listener_registered
    with _hit_listener_lock:
        if not _hit_listener_registered:
            jax.monitoring.register_event_listener(_count_jax_cache_hit)
            _hit_listener_registered = True


class ExecutableCache:
    """Serialized `jax.stages.Compiled` programs in `directory`, one file per (name, key)
    under one runner's `fingerprint`."""

    def __init__(self, directory: str, fingerprint: str):
        self.directory = directory
        self.fingerprint = fingerprint
        _listen_for_jax_cache_hits()
        self._evict_least_recently_used()

    def _evict_least_recently_used(self) -> None:
        """Above MAX_CACHE_BYTES, deletes the files least recently stored or loaded (by mtime)
        until the folder holds half of that."""
        try:
            entries = [(stat.st_mtime, stat.st_size, entry.path) for entry in os.scandir(self.directory)
                       if entry.name.endswith(".jexe") for stat in (entry.stat(),)]
        except FileNotFoundError:
            return
        total = sum(size for _, size, _ in entries)
        if total <= MAX_CACHE_BYTES:
            return
        for _, size, path in sorted(entries):
            if total <= MAX_CACHE_BYTES // 2:
                break
            with contextlib.suppress(FileNotFoundError):  # another process may have removed it
                os.remove(path)
            total -= size
        logger.info("executable cache: removed the least recently used programs from %s", self.directory)

    def named(self, name: str, function):
        """`function` named `name` + the fingerprint, for jax.jit, which names its programs' HLO
        modules after it: JAX's persistent cache then keys them apart per fingerprint, so a
        program this cache lacks is really compiled (`compile`)."""
        named = functools.partial(function)
        named.__name__ = f"{name}_{self.fingerprint[:16]}"
        return named

    def compile(self, name: str, key, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        """Compiles `lowered`, the program for (name, key), and stores it unless JAX's
        persistent compilation cache supplied it (see the module docstring)."""
        hits = getattr(_jax_cache_hits, "count", 0)
        compiled = lowered.compile()
        if getattr(_jax_cache_hits, "count", 0) == hits:
            self.store(name, key, compiled)
        else:
            logger.info("executable cache: %s %s came from JAX's compilation cache; not stored", name, key)
        return compiled

    def path(self, name: str, key) -> str:
        digest = hashlib.sha256(f"{self.fingerprint} {name} {key!r}".encode()).hexdigest()
        return os.path.join(self.directory, f"{name}-{digest[:40]}.jexe")

    def contains(self, name: str, key) -> bool:
        return os.path.exists(self.path(name, key))

    def load(self, name: str, key, devices) -> jax.stages.Compiled | None:
        """The program stored for (name, key), loaded onto `devices`; None when there is none or
        it cannot be loaded (with a warning: it is compiled again and replaced)."""
        path = self.path(name, key)
        try:
            with open(path, "rb") as f:
                payload = f.read()
        except FileNotFoundError:
            return None
        try:
            serialized, in_tree, out_tree = pickle.loads(zlib.decompress(payload))
            compiled = deserialize_and_load(serialized, in_tree, out_tree, backend=devices[0].client,
                                            execution_devices=devices)
            with contextlib.suppress(OSError):  # a read-only folder still serves
                os.utime(path)  # recently used: kept by _evict_least_recently_used
            return compiled
        except Exception as error:  # noqa: BLE001 - any unreadable entry is recompiled
            logger.warning("executable cache: cannot load %s (%s: %s); compiling it again", path,
                           type(error).__name__, error)
            return None

    def store(self, name: str, key, compiled: jax.stages.Compiled) -> None:
        """Writes the program for (name, key) (atomically: a concurrent reader sees all or
        nothing). Failing to serialize or write is logged, not raised: the cache is optional."""
        path = self.path(name, key)
        try:
            payload = zlib.compress(pickle.dumps(serialize(compiled)), 1)
            os.makedirs(self.directory, exist_ok=True)
            partial = f"{path}.{os.getpid()}.tmp"
            with open(partial, "wb") as f:
                f.write(payload)
            os.replace(partial, path)
        except Exception as error:  # noqa: BLE001 - e.g. a backend without serialization, a full disk
            logger.warning("executable cache: cannot store %s (%s: %s)", path, type(error).__name__, error)
