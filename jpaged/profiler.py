"""vLLM's start_profile / stop_profile over JAX's profiler (--profiler-config).

A trace covers the engine's steps between start and stop: the host side (scheduling, the
runner's Python, each jitted program's dispatch) and the device's work (XLA's ops, the custom
kernels' calls), written under `jax_profiler_dir` for TensorBoard's profile plugin or Perfetto
(`<dir>[/<profile_prefix>]/plugins/profile/<run>/*.xplane.pb`). vLLM's `delay_iterations` and
`max_iterations` count engine steps that ran a batch.
"""

import logging
import os

import jax

logger = logging.getLogger(__name__)

PROFILERS = ("jax",)
CONFIG_KEYS = ("profiler", "jax_profiler_dir", "delay_iterations", "max_iterations")


def check_profiler_config(config: dict) -> None:
    """ValueError unless `config` is a valid --profiler-config."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"profiler_config: unknown keys {unknown}; jpaged's are {list(CONFIG_KEYS)}.")
    if config.get("profiler") not in PROFILERS:
        raise ValueError(f"profiler_config: profiler must be 'jax' (JAX's profiler; vLLM's 'torch' and 'proton' "
                         f"profile PyTorch and Triton), got {config.get('profiler')!r}.")
    directory = config.get("jax_profiler_dir")
    if not isinstance(directory, str) or not os.path.isabs(directory):
        raise ValueError(f"profiler_config: jax_profiler_dir must be an absolute path, got {directory!r}.")
    _check_iterations(config.get("delay_iterations"), config.get("max_iterations"))


def _check_iterations(delay_iterations, max_iterations) -> None:
    for name, value in (("delay_iterations", delay_iterations), ("max_iterations", max_iterations)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


class StepProfiler:
    """One JAX trace at a time, started and stopped between engine steps (on_step after each)."""

    def __init__(self, config: dict):
        check_profiler_config(config)
        self.directory: str = config["jax_profiler_dir"]
        self.delay_iterations: int = config.get("delay_iterations") or 0
        self.max_iterations: int = config.get("max_iterations") or 0  # 0: until stop()
        self.tracing = False
        self._armed: tuple[str, int, int] | None = None  # (trace dir, steps left to delay, max steps)
        self._steps_traced = 0

    def start(self, profile_prefix: str | None = None, delay_iterations: int | None = None,
              max_iterations: int | None = None) -> None:
        """Starts a trace now, or after `delay_iterations` steps; it stops after `max_iterations`
        steps (0: at stop()). The arguments override the config's for this trace."""
        _check_iterations(delay_iterations, max_iterations)
        if self.tracing or self._armed is not None:
            raise ValueError("a profile is already running: stop_profile() first.")
        directory = self.directory if profile_prefix is None else os.path.join(self.directory, profile_prefix)
        delay = self.delay_iterations if delay_iterations is None else delay_iterations
        self._armed = (directory, delay, self.max_iterations if max_iterations is None else max_iterations)
        if delay == 0:
            self._begin()

    def stop(self) -> None:
        """Ends the trace (writing it) or a delayed start that has not begun. ValueError when the
        trace cannot be written."""
        directory, tracing = (self._armed or ("", False))[0], self.tracing
        self.tracing = False
        self._armed = None
        if tracing:
            try:
                jax.profiler.stop_trace()
            except (OSError, RuntimeError) as exc:
                raise ValueError(f"the JAX profiler could not write its trace under {directory}: {exc}") from exc
            logger.info("profile written under %s (%d engine steps)", directory, self._steps_traced)

    def on_step(self) -> None:
        """After an engine step that ran a batch: counts down the delay, or the trace's steps. A
        trace that cannot start or be written here is logged and dropped: the step's requests
        go on."""
        if self._armed is None:
            return
        directory, delay, max_steps = self._armed
        try:
            if not self.tracing:
                self._armed = (directory, delay - 1, max_steps)
                if delay - 1 <= 0:
                    self._begin()
                return
            self._steps_traced += 1
            if max_steps and self._steps_traced >= max_steps:
                self.stop()
        except ValueError as exc:
            logger.error("profiling stopped: %s", exc)
            self._armed = None

    def _begin(self) -> None:
        """Starts the armed trace; ValueError (nothing armed any more) when JAX's profiler cannot."""
        directory = self._armed[0]
        try:
            os.makedirs(directory, exist_ok=True)
            jax.profiler.start_trace(directory)
        except (OSError, RuntimeError) as exc:
            self._armed = None
            raise ValueError(f"the JAX profiler could not start a trace in {directory}: {exc}") from exc
        self.tracing = True
        self._steps_traced = 0
        logger.info("profiling into %s", directory)
