"""Training checkpoints (asynchronous Orbax saves of the whole training state) and preemption notices.

A checkpoint is one step folder with two items: "state", the TrainState (params, EMA, optimizer
state, step, RNG, skip counter) as a nested dict of plain arrays named by their paths, and "extra",
JSON (the data iterator's state, the config). Orbax writes a step under a temporary name and renames
it when whole, so a process killed mid-save leaves the earlier steps as they were and the partial
folder is never listed as a step (it is deleted when a Checkpointer next opens the folder to write). In a
bucket (gs://...), where nothing renames, Orbax writes the step folder in place and its commit_success.txt
last, and lists only steps that have one.
Restoring reads into the shardings of a target, so a checkpoint written on one mesh loads onto
another mesh shape or onto one device.
"""

import os
import signal
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from lumina_jax.buckets import absolute
from lumina_jax.models.family import Transformer
from lumina_jax.sharding import parameter_shardings
from lumina_jax.training.step import TrainState, init_train_state

STATE_ITEM = "state"
EXTRA_ITEM = "extra"


def _key_name(key) -> str:
    match key:
        case jax.tree_util.DictKey(key=name) | jax.tree_util.FlattenedIndexKey(key=name):
            return str(name)
        case jax.tree_util.GetAttrKey(name=name):
            return name
        case jax.tree_util.SequenceKey(idx=index):
            return str(index)
    raise TypeError(f"no checkpoint name for the pytree key {key!r}")


def _named_leaves(tree) -> list[tuple[tuple[str, ...], Any]]:
    """(path names, leaf) in leaf order; an nnx Variable is named by its path alone, not path + "value"."""
    plain = jax.tree.map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    flat, _ = jax.tree_util.tree_flatten_with_path(plain)
    return [(tuple(_key_name(key) for key in path), leaf) for path, leaf in flat]


def to_nested_dict(tree) -> dict:
    """The leaves of any pytree (TrainState, nnx.State, optax states) in nested dicts keyed by their path
    names: the form Orbax stores and reads without knowing our classes."""
    nested: dict = {}
    for (*parents, name), leaf in _named_leaves(tree):
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return nested


def from_nested_dict(nested: dict, like):
    """The arrays of a `to_nested_dict` result put back into the structure of `like` (classes, nnx
    Variables and their metadata included)."""
    leaves = []
    for names, _ in _named_leaves(like):
        node = nested
        for name in names:
            node = node[name]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def abstract_train_state(
    model: Transformer, optimizer: optax.GradientTransformation, mesh: Mesh | None = None
) -> TrainState:
    """Shapes, dtypes and shardings of `init_train_state(model, optimizer, ...)`, allocating nothing:
    the target to restore a checkpoint onto this mesh (None: the first device).

    model may itself be abstract (`nnx.eval_shape`).
    """
    graphdef, params = nnx.split(model)
    abstract = jax.eval_shape(
        lambda params: init_train_state(nnx.merge(graphdef, params), optimizer, jax.random.PRNGKey(0))[1], params
    )
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = parameter_shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """Saves the training state every `save_interval_steps` steps, asynchronously, keeping the last `keep`.
    With `read_only` it restores and deletes nothing: open so a folder a training may be writing (a writer
    deletes temporary step folders, the one of a save in flight among them).

    With async_save, `save` returns once the arrays are copied off the accelerator, so the caller may
    donate or change the state at once; the files are written in the background while training goes
    on. Every process calls every method (Orbax coordinates the processes).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep < 1 or save_interval_steps < 1:
            raise ValueError(f"keep ({keep}) and save_interval_steps ({save_interval_steps}) must be at least 1")
        self.directory = absolute(directory)
        if read_only:  # a reader beside a running training, whose save in flight is a temporary folder
            options = ocp.CheckpointManagerOptions(read_only=True)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=save_interval_steps,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # partial steps of killed saves
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

    def save(self, step: int, state, extra: dict | None = None, *, force: bool = False) -> bool:
        """Start saving `state` (a TrainState or any pytree of arrays) and the JSON-serialisable `extra`
        as `step` if the interval says so or `force`; returns whether a save started.

        A step already saved is not written again (a resumed run that is stopped before its first
        step would otherwise save its own starting point twice).
        """
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(to_nested_dict(state)), EXTRA_ITEM: ocp.args.JsonSave(extra or {})}
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """The state and extra of `step` (default: the latest), read into abstract_state's structure,
        dtypes and shardings (`abstract_train_state`; leaves without a sharding go to the first device)."""
        step = self._saved_step(step)
        device = SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device),
            to_nested_dict(abstract_state),
        )
        args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target), EXTRA_ITEM: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        return from_nested_dict(restored[STATE_ITEM], abstract_state), restored[EXTRA_ITEM]

    def extra(self, step: int | None = None) -> dict:
        """The extra JSON of `step` (default: the latest) alone, without reading the state."""
        args = ocp.args.Composite(**{EXTRA_ITEM: ocp.args.JsonRestore()})
        return self._manager.restore(self._saved_step(step), args=args)[EXTRA_ITEM]

    def _saved_step(self, step: int | None) -> int:
        """`step`, or the latest when None, once checked to be on disk."""
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; it holds steps {steps}")
        return step

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The complete steps on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        """Block until the save in flight, if any, is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish the save in flight and release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PreemptionWatcher:
    """Notices a preemption notice (SIGTERM) or a Ctrl-C (SIGINT) so that training can save and exit at a
    step all processes agree on: `if watcher.should_stop(step): save(force=True); wait; exit`.

    One process: a handler of both signals sets `requested`, which `should_stop` returns; a second Ctrl-C
    interrupts at once (the first puts SIGINT's previous handler back); `close` puts the previous handlers
    back. Several processes (`jax.distributed.initialize`): JAX's preemption service already handles
    SIGTERM (a Python handler would displace it) and agrees on the first step every process can still
    reach; `should_stop` asks it, so every process must call it at every step. A Ctrl-C reaches one process
    only, which could not stop alone: it interrupts as usual.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self._distributed = jax.process_count() > 1
        # A signal ignored stays ignored (SIGINT in a background job); a handler set outside Python reads as
        # None: the default is put back then.
        watched = [] if self._distributed else [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
        self._previous = {s: signal.signal(s, self._on_signal) or signal.SIG_DFL for s in watched}

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts the save too
            signal.signal(signum, self._previous[signum])

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`: the same answer on every process."""
        if self._distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
