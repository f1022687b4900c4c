"""The OpenRLHF releases the plugin runs on, what each lacks compared with 0.11.2, and how the plugin makes up for it.

Supported: every release with OpenRLHF's dotted flags, 0.10.2 through 0.11.2 (tested on CPU, each against its own
code). Older releases (flat flags: `--pretrain`, `--actor_num_nodes`) would need a port, not an adapter, and are
refused before anything starts; a release newer than the tested range runs with a warning.

Nothing outside this module asks which version is installed. It reads the installed OpenRLHF's *source* (its parser
flags, signatures, modules; without importing it, so the launcher can decide before OpenRLHF, DeepSpeed or Ray load)
into a `Features` record, and the plugin asks that record, never a version string. The differences (see GAPS):

| feature               | missing before | what the plugin does there                                                   |
|-----------------------|----------------|------------------------------------------------------------------------------|
| loss_agg_mode_flag    | 0.11.2         | passes no --actor.loss_agg_mode; the sampled step sets the policy loss to     |
|                       |                | seq-mean-token-mean itself (`aggregate_per_sequence`)                        |
| is_correction_level   | 0.11.2         | reads --algo.advantage.is_correction_enable instead (`is_correction`)        |
| actor_scales_logits   | 0.11.1         | divides the Actor's returned logits by its temperature (`returned_logits`);  |
|                       |                | detected by running Actor.forward on a stub model, not from the source       |
| step_loss_info        | 0.10.4         | calls training_step without loss_batch_info (`training_step_kwargs`); the    |
|                       |                | exact loss is then normalised per micro-batch, as OpenRLHF itself does there |
| aggregate_loss        | 0.10.3         | uses copies of 0.11.2's aggregate_loss / get_loss_batch_info (`loss_functions`,|
|                       |                | `plugin/_loss_compat.py`)                                                    |
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

OLDEST_SUPPORTED = "0.10.2"
NEWEST_TESTED = "0.11.2"
# Every release in the supported range; tests/openrlhf/test_openrlhf_versions.py runs the plugin on each.
TESTED = ("0.10.2", "0.10.3", "0.10.4", "0.11.0", "0.11.1", "0.11.2")
TESTED_RANGE = f"{OLDEST_SUPPORTED} to {NEWEST_TESTED}"


@dataclass(frozen=True)
class Gap:
    feature: str   # the Features field
    since: str     # the first release that has it
    lacks: str     # what the releases before it lack
    remedy: str    # what the plugin does on them


GAPS = (
    Gap("loss_agg_mode_flag", "0.11.2", "no --actor.loss_agg_mode flag (the policy loss is a token mean)",
        "the launcher passes no such flag; the sampled step sets PolicyLoss.token_level_loss = False "
        "(seq-mean-token-mean, what 0.11.2 gets from the flag)"),
    Gap("is_correction_level", "0.11.2", "--algo.advantage.is_correction_enable where 0.11.2 has is_correction_level",
        "the refusals read whichever the parsed args have"),
    Gap("actor_scales_logits", "0.11.1", "Actor.forward(return_output=True) returns logits not divided by "
        "--rollout.temperature", "the teacher and the student divide them by the Actor's temperature"),
    Gap("step_loss_info", "0.10.4", "ActorPPOTrainer.training_step takes no loss_batch_info",
        "the sampled step calls it without; the exact loss is normalised per micro-batch"),
    Gap("aggregate_loss", "0.10.3", "no openrlhf.models.aggregate_loss or openrlhf.utils.loss_utils",
        "the plugin uses copies of 0.11.2's (plugin/_loss_compat.py)"),
)


class UnsupportedOpenRLHFError(RuntimeError):
    """The installed OpenRLHF is not one this plugin can run on."""


# ------------------------------------------------------------------------------------------- the source


def installed_root() -> Path | None:
    """The installed `openrlhf` package folder, found without importing it (its __init__ imports DeepSpeed)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class FolderSources(Mapping):
    """{'openrlhf/...py': text} of a package folder, each file read when asked for (the gate reads four)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key.split("/", 1)[1]

    def __getitem__(self, key: str) -> str:
        if not key.startswith("openrlhf/") or not self._path(key).is_file():
            raise KeyError(key)
        return self._path(key).read_text(encoding="utf-8")

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key.startswith("openrlhf/") and self._path(key).is_file()

    def __iter__(self):
        return (f"openrlhf/{path.relative_to(self.root).as_posix()}" for path in sorted(self.root.rglob("*.py")))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def parser_flags(source: str) -> set[str]:
    """Every `--flag` string given to an `add_argument(...)` call in a module's source."""
    flags = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(arg.value for arg in node.args
                         if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"))
    return flags


def module_names(source: str) -> dict[str, ast.AST]:
    """The top-level names a module defines or imports (what `from module import NAME` can reach)."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
    return names


def method_params(source: str, cls: str, method: str) -> list[str] | None:
    """The parameter names of `cls.method` in a module's source; None when there is no such method."""
    node = module_names(source).get(cls)
    if not isinstance(node, ast.ClassDef):
        return None
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == method:
            args = item.args
            return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return None


# ----------------------------------------------------------------------------------------- the features


@dataclass(frozen=True)
class Features:
    """What an OpenRLHF release has, read from its source. Each field but `dotted_flags` is a GAPS entry."""

    dotted_flags: bool          # openrlhf/utils/config.py (hierarchize): the flag dialect the plugin speaks
    loss_agg_mode_flag: bool
    is_correction_level: bool
    step_loss_info: bool
    aggregate_loss: bool

    def missing(self) -> list[Gap]:
        return [gap for gap in GAPS if hasattr(self, gap.feature) and not getattr(self, gap.feature)]


def features_of(sources: Mapping[str, str]) -> Features:
    """Features of the OpenRLHF whose sources are given ({'openrlhf/...py': text})."""
    flags = parser_flags(sources.get("openrlhf/cli/train_ppo_ray.py", ""))
    step = method_params(sources.get("openrlhf/trainer/ray/ppo_actor.py", ""), "ActorPPOTrainer", "training_step")
    return Features(
        dotted_flags="openrlhf/utils/config.py" in sources,
        loss_agg_mode_flag="--actor.loss_agg_mode" in flags,
        is_correction_level="--algo.advantage.is_correction_level" in flags,
        step_loss_info="loss_batch_info" in (step or []),
        aggregate_loss=("aggregate_loss" in module_names(sources.get("openrlhf/models/__init__.py", ""))
                        and "openrlhf/utils/loss_utils.py" in sources),
    )


@functools.lru_cache(maxsize=1)
def features() -> Features:
    """Features of the installed OpenRLHF (read once per process)."""
    root = installed_root()
    if root is None:
        raise UnsupportedOpenRLHFError(_not_installed())
    return features_of(FolderSources(root))


# ------------------------------------------------------------------------------------------ the gate


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '0.11.2.post1+local' -> (0, 11, 2); dev suffixes ignored."""
    match = re.match(r"\d+(\.\d+)*", version.strip().lstrip("v"))
    if not match:
        raise ValueError(f"not a version: {version!r}")
    numbers = tuple(int(part) for part in match.group(0).split("."))
    return numbers + (0,) * (3 - len(numbers))


def _not_installed() -> str:
    return (f"OpenRLHF is not installed: the SafeSteer OpenRLHF engine runs on openrlhf {TESTED_RANGE} "
            "(pip install 'openrlhf>=0.10.2,<0.12', or 'openrlhf-safesteer[openrlhf]' for a fresh install)")


def gate(version: str | None, found: Features | None) -> tuple[str | None, str | None]:
    """(refusal, warning) for an OpenRLHF version and its features: pure, so every case is testable.

    A refusal is one line naming the oldest supported release; a warning names the tested range.
    """
    if version is None or found is None:
        return _not_installed(), None
    try:
        number = release(version)
    except ValueError:
        number = None
    if (number is not None and number < release(OLDEST_SUPPORTED)) or not found.dotted_flags:
        return (f"OpenRLHF {version} is older than {OLDEST_SUPPORTED}, the oldest release SafeSteer supports "
                f"(flat flags such as --pretrain need a port): upgrade to openrlhf>={OLDEST_SUPPORTED}"), None
    if number is not None and number > release(NEWEST_TESTED):
        return None, (f"OpenRLHF {version} is newer than the releases SafeSteer was tested with ({TESTED_RANGE}); "
                      "running it anyway (python -m openrlhf_safesteer.plugin.contract --installed lists what the "
                      "plugin relies on and whether this release has it)")
    return None, None


def check_installed() -> str:
    """The installed OpenRLHF's version, after the gate: raises UnsupportedOpenRLHFError (one line), logs a
    warning for an untested newer release. Reads source and metadata only; imports no OpenRLHF."""
    version = installed_version()
    found = features() if version is not None and installed_root() is not None else None
    refusal, warning = gate(version, found)
    if refusal:
        raise UnsupportedOpenRLHFError(refusal)
    if warning:
        logger.warning("%s", warning)
    for gap in found.missing():
        logger.info("OpenRLHF %s: %s; %s", version, gap.lacks, gap.remedy)
    return version


# --------------------------------------------------------------------------------- what the plugin calls


def default_flags_supported(found: Features | None = None) -> dict[str, bool]:
    """Which of the flags the launcher may add to OpenRLHF's argv this OpenRLHF's parser knows."""
    found = found or features()
    return {"--actor.loss_agg_mode": found.loss_agg_mode_flag}


def is_correction(advantage_args) -> tuple[bool, str]:
    """(on, flag): whether rollout importance-sampling correction is on, and the flag that turns it on."""
    level = getattr(advantage_args, "is_correction_level", None)
    if level is not None:
        return level != "off", "--algo.advantage.is_correction_level"
    return bool(getattr(advantage_args, "is_correction_enable", False)), "--algo.advantage.is_correction_enable"


def has_loss_agg_mode(args) -> bool:
    """Whether OpenRLHF's parsed args carry --actor.loss_agg_mode (in a Ray worker the args are what we have)."""
    return hasattr(args.actor, "loss_agg_mode")


def aggregate_per_sequence(trainer) -> None:
    """The sampled objective's seq-mean-token-mean policy loss on an OpenRLHF without --actor.loss_agg_mode:
    PolicyLoss has had `token_level_loss` since 0.10.2, and False is what 0.11.2's flag value selects."""
    trainer.actor_loss_fn.token_level_loss = False


def training_step_kwargs(step: Callable, loss_batch_info) -> dict:
    """The keyword arguments for OpenRLHF's `ActorPPOTrainer.training_step` beyond (experience, kl_ctl, step)."""
    import inspect

    return {"loss_batch_info": loss_batch_info} if "loss_batch_info" in inspect.signature(step).parameters else {}


def loss_functions() -> tuple[Callable, Callable]:
    """(aggregate_loss, get_loss_batch_info): OpenRLHF's own where it has them, else 0.11.2's, copied."""
    try:
        from openrlhf.models import aggregate_loss
        from openrlhf.utils.loss_utils import get_loss_batch_info
    except ImportError:
        from openrlhf_safesteer.plugin._loss_compat import aggregate_loss, get_loss_batch_info
    return aggregate_loss, get_loss_batch_info


@functools.lru_cache(maxsize=1)
def actor_scales_logits() -> bool:
    """Whether OpenRLHF's Actor.forward(return_output=True) divides the logits it returns by its temperature.

    Found by running it, on a stub with constant logits at temperature 2 (no model, no weights): the change in
    0.11.1 was one moved line, which a source check could miss or mistake. Call where OpenRLHF imports (a Ray
    actor, or after compat.prepare_process())."""
    import torch
    from openrlhf.models.actor import Actor

    logits = torch.ones(1, 3, 4)

    def stub_model(*args, **kwargs):
        return {"logits": logits.clone()}

    stub = _Stub(model=stub_model, temperature=2.0, packing_samples=False)
    sequences = torch.zeros(1, 3, dtype=torch.long)
    output = Actor.forward(stub, sequences, None, torch.ones(1, 3, dtype=torch.long), return_output=True)
    return bool(torch.allclose(output["logits"], logits / 2))


class _Stub:
    """An attribute bag standing in for an Actor (getattr of a missing attribute raises, as on a real one)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def returned_logits(logits, temperature: float):
    """The logits an OpenRLHF Actor returned, divided by its temperature as 0.11.2's Actor divides them: the
    teacher's and the student's log-probs then describe the temperature-scaled policy the rollouts sampled from."""
    if temperature == 1.0 or actor_scales_logits():
        return logits
    return logits / temperature


def feature_table(found: Features) -> list[tuple[str, bool]]:
    return [(field.name, getattr(found, field.name)) for field in fields(found)]
