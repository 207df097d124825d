"""Cluster profiles: YAML data with a `cluster:` part and a `train:` part.

A profile is read from a folder on $GRPO_PROFILES_DIR, else from the
profiles shipped inside the package (jobs/cluster_profiles/<name>.yaml, found
through importlib.resources, so an installed wheel has them too), or from any path, merged over the profile it `extends:`, given
dotted overrides (`cluster.partition=big`, `train.rollout.n=8`) and built as
strictly as the trainer's own config: an unknown key or a wrong type is one
line that names the valid keys. Building reuses grpo_core.config, so the
same text means the same value in YAML and on the command line.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from grpo_core.config import INT_MAX, TrainConfig, check_layout, validate
from grpo_core.strictconf import (ConfigError, apply_overrides, build, check_text, locate, read_yaml, to_dict,
                                  yaml_lines)
from grpo_core.secrecy import looks_secret, secret_in
from grpo_core.walltime import TIME_FORMS, limit_minutes, parse_time_limit

# Package data: in the checkout and in an installed wheel alike (a wheel is
# installed as plain files, so the Traversable is a real folder).
BUILTIN_DIR = Path(str(resources.files("jobs").joinpath("cluster_profiles")))
TEMPLATES_DIR = Path(str(resources.files("jobs").joinpath("templates")))
PROFILES_ENV = "GRPO_PROFILES_DIR"

# submitit writes these itself (logs, requeue signal, arrays); a second value
# from a profile would silently fight it.
SUBMITIT_OWNED = ("output", "error", "open-mode", "signal", "array")
# Options that have a typed field of their own: one place per setting.
HAS_FIELD = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes", "time": "time",
             "mem": "mem", "cpus-per-task": "cpus_per_task", "gpus-per-node": "gpus_per_node",
             "ntasks-per-node": "tasks_per_node", "job-name": "<the run name>"}
# Values sbatch reads from "#SBATCH --key=value" lines, where nothing can be
# quoted: a space, quote or '#' would cut or change the directive.
SBATCH_VALUE_RE = re.compile(r"^[^\s\"'\\#]+$")
SLURM_NAME_RE = re.compile(r"^[A-Za-z0-9_.,:+@-]*$")  # partition, account, qos (lists are comma-separated)
SLURM_MEM_RE = re.compile(r"^(?:\d+[KMGTkmgt]?)?$")  # sbatch --mem: 200G, 500000M, 64000 (MiB)
# The run dir lands unquoted in submitit's "#SBATCH --output=DIR/%j_0_log.out" (and % is a pattern there).
SLURM_PATH_RE = re.compile(r"^[A-Za-z0-9_./+@:,=~-]+$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SBATCH_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
MAPPING_FIELDS = ("env", "sbatch")  # YAML mappings, stored as ("KEY=VALUE", ...)
# Earlier spellings of cluster keys, still read (older profiles, run dirs' profile.yaml): old -> new.
CLUSTER_ALIASES = {"time_min": "time"}  # whole minutes, which is cluster.time's MM form
TOP_KEYS = ("cluster", "description", "extends", "train")
BASE_PREFIX = "_"  # _qwen14b.yaml: shared settings, extended by h100x2 and h800x4, never run itself


@dataclass(frozen=True)
class ClusterConfig:
    launcher: str = "slurm"  # local: this machine, no Slurm
    template: str = "grpo"  # jobs/templates/<template>.sbatch.j2 (shipped in the package)
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""  # sbatch --account; "" = your default account
    qos: str = ""  # sbatch --qos; "" = the default QOS
    nodes: int = 1  # sbatch --nodes
    tasks_per_node: int = 1  # one rank per GPU for FSDP
    gpus_per_node: int = 0  # sbatch --gpus-per-node; 0 = none requested
    cpus_per_task: int = 0  # 0 = the cluster's default
    mem: str = ""  # sbatch --mem, e.g. "200G"; "" = the cluster's default
    # sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (90, 4:00:00, 2-00:00:00); a bare
    # number is minutes. Slurm counts whole minutes (seconds round up), and so does the script.
    time: str = "60"
    signal_lead_s: int = 300  # USR2 this long before the time limit: enough to checkpoint
    max_requeues: int = 100  # submitit's own timeout countdown, for signals before the trainer starts
    python: str = ""  # interpreter path on the compute nodes (one word, quoted); "" = the one running jobs.submit
    workdir: str = ""  # the job cds here; "" = the directory jobs.submit ran in
    setup: tuple[str, ...] = ()  # shell lines run before the trainer (module load ...); code by design, not quoted
    env: tuple[str, ...] = ()  # KEY=VALUE, exported (quoted) in the script; one entry: cluster.env.KEY=VALUE
    sbatch: tuple[str, ...] = ()  # extra sbatch options: key=value, or a bare flag; one: cluster.sbatch.KEY=VALUE

    @property
    def time_min(self) -> int:
        """The limit Slurm applies, in whole minutes (what submitit writes as --time)."""
        return limit_minutes(parse_time_limit(self.time))

    def env_map(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.env)

    def sbatch_map(self) -> dict[str, str | bool]:
        return {k: (v[0] if v else True) for k, *v in (item.split("=", 1) for item in self.sbatch)}


@dataclass(frozen=True)
class Profile:
    name: str
    cluster: ClusterConfig
    train: TrainConfig
    description: str = ""
    source: str = ""  # where it was read from (for messages only)

    def to_data(self) -> dict[str, Any]:
        """Plain data that load_profile reads back to an equal Profile."""
        cluster = to_dict(self.cluster)
        cluster["env"] = self.cluster.env_map()
        cluster["sbatch"] = self.cluster.sbatch_map()
        return {"description": self.description, "cluster": cluster, "train": to_dict(self.train)}


@dataclass(frozen=True)
class _ProfileData:  # the shape `build` and `apply_overrides` check against
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def cluster_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of cluster keys that take one of a few (checked on load, listed by --help)."""
    templates = tuple(sorted(p.name.removesuffix(".sbatch.j2") for p in TEMPLATES_DIR.glob("*.sbatch.j2")))
    return {"launcher": ("slurm", "local"), "template": templates}


def key_reference() -> str:
    """Every cluster.* and train.* key with type, default, allowed values and comment (jobs --help)."""
    from grpo_core.config import CHOICES
    from grpo_core.keyref import format_keys

    return format_keys(ClusterConfig, "cluster.", cluster_choices()) + "\n\n" + format_keys(TrainConfig, "train.", CHOICES)


# ---------------------------------------------------------------- finding

def search_path() -> list[Path]:
    """$GRPO_PROFILES_DIR (colon-separated, first wins), then the shipped profiles."""
    dirs = [Path(p).expanduser() for p in os.environ.get(PROFILES_ENV, "").split(":") if p.strip()]
    return dirs + [BUILTIN_DIR]


def list_profiles(folders: Sequence[Path] | None = None) -> dict[str, Path]:
    """Every profile name in `folders` (default: the search path) -> its file (earlier folders
    shadow later ones). A name starting with BASE_PREFIX is a base that recipes extend (found, not listed)."""
    found: dict[str, Path] = {}
    for folder in search_path() if folders is None else folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if not path.stem.startswith(BASE_PREFIX):
                    found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or os.sep in name


def find_profile(name_or_path: str, relative_to: Path | None = None, skip: tuple[Path, ...] = ()) -> Path:
    """A path, or the first profile of that name on the search path that is not in `skip`.

    `skip` lets a user's local.yaml say `extends: local` (or extend a shipped
    profile that does) and get the shipped one instead of itself.
    """
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_absolute() and relative_to is not None and (relative_to / path).is_file():
            path = relative_to / path
        if not path.is_file():
            raise ConfigError(f"profile file not found: {name_or_path}")
        return path
    for folder in search_path():
        path = folder / f"{name_or_path}.yaml"
        if path.is_file() and path.resolve() not in skip:
            return path
    known = list_profiles()
    raise ConfigError(f"unknown profile '{name_or_path}'; known profiles: {', '.join(known) or '(none)'}")


def describe(path: Path) -> str:
    """The profile's one-line description (for --list-profiles); never raises."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return " ".join(str(data.get("description", "")).split()) if isinstance(data, dict) else ""
    except (OSError, yaml.YAMLError):
        return "(unreadable)"


# ---------------------------------------------------------------- loading

def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` wins; mappings merge key by key; lists and scalars are replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = (), files: list[Path] | None = None) -> dict[str, Any]:
    """The file's data merged over its `extends:` chain (without `extends`); `files` collects the chain."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{seen[-1]}: extends cycle: {' -> '.join(p.stem for p in seen + (path,))}")
    data = read_yaml(path)
    if files is not None:
        files.append(path)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        line = yaml_lines(path).get(unknown[0])
        raise ConfigError(f"{path}{f':{line}' if line else ''}: unknown key '{unknown[0]}'; "
                          f"valid keys under '<top>': {', '.join(TOP_KEYS)}")
    for part in ("cluster", "train"):
        if not isinstance(data.get(part, {}), Mapping):
            raise ConfigError(f"profile {path.stem}: '{part}' must be a mapping")
    if "cluster" in data:  # per file, so that a child's old spelling still overrides its parent's new one
        data["cluster"] = _current_keys(data["cluster"], str(path))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"profile {path.stem}: 'extends' must be a profile name or path")
    chain = seen + (path,)
    try:
        found = find_profile(parent, relative_to=path.parent, skip=chain)
    except ConfigError:
        # By name, the chain's own files are skipped (local.yaml may extend the shipped local):
        # a name that only they have is a cycle, not an unknown profile.
        if _looks_like_path(parent) or not any(p.stem == parent for p in chain):
            raise
        raise ConfigError(f"{path}: extends cycle: {' -> '.join(p.stem for p in chain)} -> {parent} "
                          f"(no other profile named '{parent}' to extend)") from None
    base = _read_raw(found, chain, files)
    base.pop("description", None)  # a description belongs to one file
    return deep_merge(base, data)


def _current_keys(cluster: Mapping[str, Any], where: str) -> dict[str, Any]:
    """cluster keys under their current names (CLUSTER_ALIASES); old and new name together are refused."""
    out = dict(cluster)
    for old, new in CLUSTER_ALIASES.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{where}: cluster.{old} is the old name of cluster.{new}; set only cluster.{new}")
            out[new] = out.pop(old)
    return out


def _current_override(item: str) -> str:
    key, sep, value = item.partition("=")
    head, _, name = key.strip().partition(".")
    return f"cluster.{CLUSTER_ALIASES[name]}={value}" if sep and head == "cluster" and name in CLUSTER_ALIASES else item


def _time_text(cluster: dict[str, Any]) -> None:
    """cluster.time as text: YAML reads `time: 90` as a number, which is sbatch's MM form."""
    value = cluster.get("time")
    if isinstance(value, int) and not isinstance(value, bool):
        cluster["time"] = str(value)
    elif value is not None and not isinstance(value, str):
        raise ConfigError(f"cluster.time: {value!r} is not a Slurm time; use {TIME_FORMS}")


def _mapping_to_items(value: Any, where: str) -> Any:
    """env/sbatch mappings -> ("KEY=VALUE", ...); a bare sbatch flag is `key: true`."""
    if not isinstance(value, Mapping):
        return value  # a list of KEY=VALUE strings is accepted as is
    items = []
    for key, val in value.items():
        if val is False or val is None:
            continue
        if not isinstance(val, (str, int, float, bool)):
            raise ConfigError(f"{where}.{key}: expected a string or number, got {type(val).__name__} {val!r}")
        items.append(str(key) if val is True else f"{key}={val}")
    return items


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """`cluster.env.K=V` / `cluster.sbatch.K=V` set one entry; the rest go to apply_overrides."""
    plain: list[str] = []
    entries: dict[str, dict[str, Any]] = {name: {} for name in MAPPING_FIELDS}
    for item in overrides:
        key, sep, value = item.partition("=")
        head, _, sub = key.strip().partition(".")
        if head not in ("cluster", "train"):
            raise ConfigError(f"override {item!r}: keys start with 'cluster.' or 'train.' (e.g. train.rollout.n=8)")
        name, dot, entry = sub.partition(".")
        if head == "cluster" and name in MAPPING_FIELDS and dot and sep:
            flag = {"true": True, "false": False}.get(value.strip().lower()) if name == "sbatch" else None
            entries[name][entry] = value if flag is None else flag
        else:
            plain.append(item)
    return plain, entries


def _check_cluster(c: ClusterConfig, train: TrainConfig) -> None:
    for key, allowed in cluster_choices().items():
        if getattr(c, key) not in allowed:
            raise ConfigError(f"cluster.{key}={getattr(c, key)!r}; valid values: {', '.join(allowed)}")
    try:
        parse_time_limit(c.time)
    except ValueError as exc:
        raise ConfigError(f"cluster.time: {exc}") from None
    for key in ("nodes", "tasks_per_node", "signal_lead_s"):
        if getattr(c, key) < 1:
            raise ConfigError(f"cluster.{key}={getattr(c, key)} must be >= 1")
    for key in ("gpus_per_node", "cpus_per_task", "max_requeues"):
        if getattr(c, key) < 0:
            raise ConfigError(f"cluster.{key}={getattr(c, key)} must be >= 0")
    for key in ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "max_requeues"):
        if getattr(c, key) > INT_MAX:  # sbatch and submitit read them as C ints
            raise ConfigError(f"cluster.{key}={getattr(c, key)} must be at most {INT_MAX}")
    # Slurm's --signal accepts at most 65535 s, and a lead as long as the job never lets it run.
    if c.signal_lead_s > min(65535, c.time_min * 60 // 2):
        raise ConfigError(f"cluster.signal_lead_s={c.signal_lead_s} must be at most half of cluster.time "
                          f"({c.time!r}: {c.time_min} min) and <= 65535")
    for key, pattern, what in (("partition", SLURM_NAME_RE, "letters, digits and _.,:+@-"),
                               ("account", SLURM_NAME_RE, "letters, digits and _.,:+@-"),
                               ("qos", SLURM_NAME_RE, "letters, digits and _.,:+@-"),
                               ("mem", SLURM_MEM_RE, "a number with an optional K, M, G or T (e.g. 200G)")):
        if not pattern.match(getattr(c, key)):
            raise ConfigError(f"cluster.{key}={getattr(c, key)!r}: sbatch cannot take that; use {what}")
    for item in c.env:
        key, sep, _ = item.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise ConfigError(f"cluster.env: {item!r} is not NAME=VALUE with a shell variable name")
        if looks_secret(key):
            raise ConfigError(f"cluster.env.{key} looks like a secret: keep it in your environment "
                              "(Slurm passes it to the job); profiles and scripts never hold secrets")
    for line in c.setup:
        if any(looks_secret(name) for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", line)):
            raise ConfigError("cluster.setup sets what looks like a secret: keep it in your environment "
                              "(Slurm passes it to the job); profiles and scripts never hold secrets")
    for key, value in c.sbatch_map().items():
        if value is not True and not SBATCH_VALUE_RE.match(value):
            raise ConfigError(f"cluster.sbatch.{key}={value!r}: an #SBATCH value cannot hold spaces, quotes, "
                              "'#' or backslashes")
    for key in c.sbatch_map():
        if not SBATCH_KEY_RE.match(key):
            raise ConfigError(f"cluster.sbatch: {key!r} is not an sbatch option name (like constraint or exclusive)")
        norm = key.replace("_", "-")
        if norm in SUBMITIT_OWNED:
            raise ConfigError(f"cluster.sbatch.{key}: submitit sets --{norm} itself; "
                              f"it owns: {', '.join(SUBMITIT_OWNED)}")
        if norm in HAS_FIELD:
            raise ConfigError(f"cluster.sbatch.{key}: use cluster.{HAS_FIELD[norm]} instead")
    if re.search(r"://[^/@\s]*:[^/@\s]*@", train.tracking.tracking_uri):
        raise ConfigError("train.tracking.tracking_uri holds credentials: use MLFLOW_TRACKING_USERNAME/"
                          "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in your environment instead")
    for part, values in (("cluster", to_dict(c)), ("train", to_dict(train))):
        for key, value in _strings(values, part + "."):
            found = secret_in(value)
            if found:
                raise ConfigError(f"{key} holds {found}: keep secrets in your environment, not in a profile")
    gpus = c.nodes * c.gpus_per_node
    if gpus and train.rollout.tensor_parallel_size > gpus:
        raise ConfigError(f"train.rollout.tensor_parallel_size={train.rollout.tensor_parallel_size} exceeds "
                          f"the {gpus} GPU(s) of cluster.nodes x cluster.gpus_per_node")
    try:
        check_layout(train, c.nodes * c.tasks_per_node)
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None


def _override_keys(overrides: Sequence[str]) -> list[str]:
    return [item.partition("=")[0].strip() for item in overrides]


def _strings(data: Mapping[str, Any], prefix: str) -> list[tuple[str, str]]:
    out = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            out += _strings(value, f"{prefix}{key}.")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, str):
                out.append((f"{prefix}{key}", item))
    return out


def profile_from_data(name: str, data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "",
                      files: Sequence[Path] = ()) -> Profile:
    """Merged profile data + dotted overrides -> a validated Profile.

    `files`: the YAML files it came from, most specific first, so an error names file:line."""
    if not name.isprintable():
        raise ConfigError(f"profile name {name!r}: use printable characters")
    data = dict(data)
    description = data.pop("description", "") or ""
    data.pop("extends", None)
    overrides = [_current_override(item) for item in overrides]
    try:
        plain, entries = _split_overrides(overrides)
        merged = apply_overrides(_ProfileData, {"cluster": _current_keys(data.get("cluster") or {}, source or name),
                                                "train": dict(data.get("train") or {})}, plain)
        cluster = dict(merged["cluster"])
        _time_text(cluster)
        for fname in MAPPING_FIELDS:
            current = cluster.get(fname, {})
            if entries[fname]:
                if not isinstance(current, Mapping):
                    current = dict(str(i).split("=", 1) if "=" in str(i) else (str(i), True) for i in current)
                current = {**current, **entries[fname]}
            cluster[fname] = _mapping_to_items(current, f"cluster.{fname}")
        built = build(_ProfileData, {"cluster": cluster, "train": merged["train"]})
        check_text(to_dict(built.cluster), "cluster.")
        try:
            validate(built.train)
        except ConfigError as exc:  # the trainer's keys, as a profile spells them
            raise ConfigError(f"train.{exc}") from None
        _check_cluster(built.cluster, built.train)
    except ConfigError as exc:
        raise ConfigError(f"profile {name}: {locate(str(exc), [(f, '') for f in files], _override_keys(overrides))}") from None
    if not isinstance(description, str):
        raise ConfigError(f"profile {name}: description must be a string")
    return Profile(name=name, cluster=built.cluster, train=built.train,
                   description=" ".join(description.split()), source=source)


def load_profile(name_or_path: str, overrides: Sequence[str] = ()) -> Profile:
    """Find, merge `extends`, apply overrides, build strictly and validate."""
    path = find_profile(name_or_path)
    files: list[Path] = []
    data = _read_raw(path, files=files)
    return profile_from_data(path.stem, data, overrides, source=str(path), files=files)


def dump_profile(profile: Profile) -> str:
    """YAML of the resolved profile (what the run dir keeps as profile.yaml)."""
    return yaml.safe_dump({"name": profile.name, **profile.to_data()}, sort_keys=False)


def load_resolved(path: Path, overrides: Sequence[str] = ()) -> Profile:
    """Read a run dir's profile.yaml back (resubmit)."""
    data = read_yaml(path)
    name = str(data.pop("name", path.stem))
    return profile_from_data(name, data, overrides, source=str(path), files=[path])


def replace_train(profile: Profile, **sections: Any) -> Profile:
    """A copy with train sections' fields replaced, e.g. trainer={"run_dir": ...}."""
    train = profile.train
    for section, values in sections.items():
        train = dataclasses.replace(train, **{section: dataclasses.replace(getattr(train, section), **values)})
    return dataclasses.replace(profile, train=train)
