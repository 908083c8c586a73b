"""The code deps and params of each DVC stage, derived from the code by static analysis (Python `ast`).

    python scripts/dvc_deps.py            # print what the code says each stage runs and reads
    python scripts/dvc_deps.py --check    # exit 1 if dvc.yaml disagrees (names the stage and the entries)
    python scripts/dvc_deps.py --write    # rewrite the code deps and params of dvc.yaml in place

Only the entries this script derives are touched: `deps` under the package folder (`tdm/...`) and the plain
`params` keys. Everything else in dvc.yaml stays as written: comments, the other deps (upstream outputs such as
`outputs/teacher_ft/model`, metrics files), outs, metrics, plots, stages that run no `tdm` command.

Rules
-----
Which stages: every dvc.yaml stage whose `cmd` runs a tdm subcommand (`tdm distill -q`, `python -m tdm.cli
distill`, `accelerate launch ... -m tdm.cli distill`); the subcommand `teacher-ft` is `cmd_teacher_ft` in
tdm/cli.py, and its stage module is `tdm/teacher_ft.py` (skipped if absent).

Code = the files the command runs: the transitive closure of tdm-internal imports, starting from
  - the stage module `tdm/<subcommand with underscores>.py`,
  - tdm/cli.py itself, but not all of it (it imports every stage lazily): its module-level statements, `main`
    (the entry point), `cmd_<subcommand>`, and the cli.py functions these call by name, transitively
    (`_load_config`, `_tracked`, ...; the other `cmd_*` are only referenced by the parser, never called).
Imports are `import tdm.a.b`, `from tdm.a import b` (b counts when it is a submodule), `from . import b`
(relative), and `importlib.import_module("tdm.a")` with a literal name; anywhere in a module, function bodies
included (the code imports lazily). Importing `tdm.a.b` runs `tdm/__init__.py` and `tdm/a/__init__.py` too,
and a package's `__init__.py` is followed like any module (tdm/backbones/__init__.py imports its submodules).
Files run without being imported: a string literal that is exactly a relative `.py` path existing next to
the module holding it (tdm/evaluation/vbench.py: `Path(__file__).with_name("_vbench_driver.py")`, run as a
subprocess) is part of the closure and followed in turn. Detected, not tabled, so a new driver is not missed.

Deps list: sorted; a folder (`tdm/backbones`) when the closure holds every `.py` file under it (recursively;
the topmost such folder), otherwise the files. DVC then hashes the whole folder, which is what it runs.

Params = what the closure's modules read of the config (`tdm.config.Config`; its sections and their keys are
read from tdm/config.py with `ast`). `<c>` below is the config object: a name `cfg`, `*_cfg` or `config`, or an
attribute `.cfg` / `.*_cfg` (`cfg`, `ft_cfg`, `self.cfg`, `trainer.cfg`), so `backbone.model` or
`scheduler.config.sample_size` (diffusers configs) never match.
  - `<c>.<section>.<key>`  -> `section.key`   (a key that is no field of the section, e.g. a method call such
                              as `cfg.distill.model_dump()`, reads the whole section)
  - `<c>.<section>` used any other way (`d = cfg.distill`, `build_backbone(cfg.model)`) -> `section`
  - `dump(<c>)["section"]`, or `dump(<c>)[NAME]` with a module-level string constant `NAME = "section"`
                              -> `section` (an unresolvable subscript reads every section)
  - `dump(<c>)` not subscripted is the whole config recorded as provenance (tdm_params.json beside a model,
    the MLflow run's params): not a dependency. Code that computes from a dump must subscript it directly:
    reads through a dump kept in a variable, or through `getattr(<c>, name)`, are not seen.
  - reads inside the functions of PROVENANCE_FUNCTIONS (a table, with reasons) do not count either: the MLflow
    tags of cli.py's `_tracked`; training.py's `fingerprint` (the resume check, which reads a dump in a
    variable and sections by computed name: the sections its callers name, which the callers read).
  - a `section.key` collapses into `section` when the stage reads the whole section.
  - a key the code reads that params.yaml does not hold (a config default) becomes its whole section: DVC can
    only track values present in params.yaml (it fails on a missing key) and adding the key to the section
    changes the section. A section absent from params.yaml is an error (add it there).
A stage that reads no params gets no `params` entry (report: it reads files only).

Conservative by design: an import serving one function of a module makes the whole module a dependency of
every stage that imports the module, with everything that module reads.
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "tdm"
CLI = "tdm/cli.py"
ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = re.compile(r"^(cfg|\w+_cfg)$")  # a name or attribute holding the Config; also the bare name `config`
RUNTIME_FILE = re.compile(r"^[\w./-]+\.py$")
# Functions whose config reads do not change what a stage computes (their imports still count as code).
PROVENANCE_FUNCTIONS = {
    (CLI, "_tracked"): "the stage's MLflow run: cfg.model.family and cfg.distill.k become run tags",
    ("tdm/training.py", "fingerprint"): "the resume check: hashes the sections its callers name (and read "
                                        "themselves); resuming or starting afresh trains the same weights",
}


# -- modules ------------------------------------------------------------------------------------------------

@dataclass
class Module:
    name: str  # dotted: tdm.evaluation.runner
    path: Path  # relative to the project root
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


@dataclass
class Facts:
    """What some statements of a module do: the package modules they import (or run), the params they read."""

    imports: set[str]
    params: set[str]


class Project:
    """The package's modules, parsed and analysed once each."""

    def __init__(self, root: Path):
        self.root = root
        self._modules: dict[str, Module] = {}
        self._facts: dict[str, Facts] = {}
        self.sections = config_sections(self)

    def facts(self, name: str, nodes: list[ast.AST] | None = None) -> Facts:
        """Facts of the whole module (cached), or of some of its statements."""
        module = self.module(name)
        if nodes is not None:
            return analyse(nodes, module, self)
        if name not in self._facts:
            self._facts[name] = analyse([module.tree], module, self)
        return self._facts[name]

    def path_of(self, name: str) -> Path | None:
        """tdm.a.b -> tdm/a/b.py or tdm/a/b/__init__.py (relative), None if it is not a module of ours."""
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            return None
        base = Path(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if (self.root / candidate).is_file():
                return candidate
        return None

    def module(self, name: str) -> Module:
        if name not in self._modules:
            path = self.path_of(name)
            self._modules[name] = Module(name, path, parse_source(path, (self.root / path).read_text()))
        return self._modules[name]

    def name_of(self, path: Path) -> str:
        parts = path.with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def py_files(self, folder: Path) -> set[Path]:
        return {p.relative_to(self.root) for p in (self.root / folder).rglob("*.py") if "__pycache__" not in p.parts}


@functools.lru_cache(maxsize=None)
def parse_source(path: Path, source: str) -> ast.Module:
    """Parsed once per content (the tests derive many copies of the same files)."""
    return ast.parse(source, filename=str(path))


# -- imports ------------------------------------------------------------------------------------------------

def with_parents(name: str) -> list[str]:
    """Importing tdm.a.b runs tdm, tdm.a and tdm.a.b."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def resolve_relative(module: Module, level: int, target: str | None) -> str:
    base = module.package.split(".")
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join([*base, *([target] if target else [])])


def walk(tops: list[ast.AST]) -> list[tuple[ast.AST, ast.AST | None]]:
    """Every node under these statements, with its parent."""
    out, stack = [], [(top, None) for top in tops]
    while stack:
        node, parent = stack.pop()
        out.append((node, parent))
        stack.extend((child, node) for child in ast.iter_child_nodes(node))
    return out


def imported_names(walked: list[tuple[ast.AST, ast.AST | None]], module: Module, project: Project) -> set[str]:
    """Dotted names of the package's modules that these nodes import (parents included)."""
    found: set[str] = set()
    for node, _ in walked:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve_relative(module, node.level, node.module) if node.level else node.module or ""
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and _called_name(node) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            found.update(n for n in with_parents(target) if project.path_of(n) is not None)
    return found


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def runtime_files(walked: list[tuple[ast.AST, ast.AST | None]], module: Module, project: Project) -> set[str]:
    """Modules run without an import: a string literal naming a .py file next to the referencing module."""
    found = set()
    for node, _ in walked:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and RUNTIME_FILE.match(node.value):
            path = Path(os.path.normpath(module.path.parent / node.value))
            if path.parts[0] == PACKAGE and (project.root / path).is_file():
                found.add(project.name_of(path))
    return found


def analyse(tops: list[ast.AST], module: Module, project: Project) -> Facts:
    walked = walk(tops)
    return Facts(imported_names(walked, module, project) | runtime_files(walked, module, project),
                 params_read(walked, module, project.sections))


# -- what a stage runs --------------------------------------------------------------------------------------

def cli_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def cli_entry_nodes(cli: Module, command: str) -> list[ast.AST]:
    """The parts of cli.py a `tdm <command>` run executes: module-level statements, `main`, `cmd_<command>`
    and the cli.py functions they call by name (transitively)."""
    functions = cli_functions(cli.tree)
    entry = f"cmd_{command}"
    if entry not in functions:
        raise SystemExit(f"dvc_deps: {CLI} has no {entry} (the stage's command)")
    reached, todo = set(), ["main", entry]
    while todo:
        name = todo.pop()
        if name in reached or name not in functions:
            continue
        reached.add(name)
        todo += [_called_name(n) for n in ast.walk(functions[name]) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name)]
    top_level = [n for n in cli.tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return top_level + [functions[name] for name in sorted(reached)]


def stage_closure(project: Project, command: str, via: dict[str, str] | None = None) -> dict[str, Facts]:
    """{module name: its facts} for the modules `tdm <command>` runs (of cli.py: the parts that run).
    `via`, if given, gets {module: the module that first brought it in}."""
    via = {} if via is None else via
    cli = project.module(project.name_of(Path(CLI)))
    closure = {cli.name: project.facts(cli.name, cli_entry_nodes(cli, command))}
    todo = [cli.name]
    stage_module = f"{PACKAGE}.{command}"
    if project.path_of(stage_module) is not None:
        todo.append(stage_module)
        via[stage_module] = "the stage module"
    while todo:
        name = todo.pop(0)
        if name not in closure:
            closure[name] = project.facts(name)
        for found in sorted(closure[name].imports):
            if found not in closure and found not in via:
                via[found] = name
                todo.append(found)
    return closure


def code_deps(project: Project, closure: dict[str, Facts]) -> list[str]:
    """The closure's files, a folder standing for all of its .py files when the closure holds them all."""
    files = {project.module(name).path for name in closure}
    folders = sorted({p.parent for p in files} | {parent for p in files for parent in p.parents if parent.parts},
                     key=lambda p: len(p.parts))
    entries, covered = [], set()
    for folder in folders:  # topmost first
        if not any(parent in covered for parent in folder.parents) and project.py_files(folder) <= files:
            covered.add(folder)
            entries.append(folder.as_posix())
    entries += [p.as_posix() for p in files if not any(parent in covered for parent in p.parents)]
    return sorted(entries)


# -- params -------------------------------------------------------------------------------------------------

def config_sections(project: Project) -> dict[str, set[str]]:
    """{section: its keys} from tdm/config.py: the fields of `Config` and of each field's section class."""
    tree = project.module(f"{PACKAGE}.config").tree
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict[str, ast.expr]:
        cls = classes[name]
        inherited = {}
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                inherited.update(fields(base.id))
        own = {n.target.id: n.annotation for n in cls.body if isinstance(n, ast.AnnAssign)
               and isinstance(n.target, ast.Name) and not is_class_var(n.annotation)}
        return {**inherited, **own}

    sections = {}
    for section, annotation in fields("Config").items():
        cls = annotation.id if isinstance(annotation, ast.Name) else None
        sections[section] = set(fields(cls)) if cls in classes else set()
    return sections


def is_class_var(annotation: ast.expr) -> bool:
    """`ClassVar[...]` (a class constant such as BOOKKEEPING, not a params key)."""
    base = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return (isinstance(base, ast.Name) and base.id == "ClassVar") or (isinstance(base, ast.Attribute)
                                                                      and base.attr == "ClassVar")


def is_config_object(node: ast.AST) -> bool:
    """`cfg`, `ft_cfg`, `config`, `self.cfg`, `trainer.cfg`; not `scheduler.config` (a diffusers config)."""
    if isinstance(node, ast.Name):
        return node.id == "config" or CONFIG_NAME.match(node.id) is not None
    return isinstance(node, ast.Attribute) and CONFIG_NAME.match(node.attr) is not None


def string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "text"` assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def provenance_nodes(module: Module) -> set[int]:
    """ids of the AST nodes inside this module's PROVENANCE_FUNCTIONS."""
    names = {function for path, function in PROVENANCE_FUNCTIONS if path == module.path.as_posix()}
    return {id(n) for f in module.tree.body if isinstance(f, ast.FunctionDef) and f.name in names
            for n in ast.walk(f)}


def params_read(walked: list[tuple[ast.AST, ast.AST | None]], module: Module, sections: dict[str, set[str]]) -> set[str]:
    """`section` / `section.key` entries for what these nodes read of the config."""
    skip = provenance_nodes(module)
    constants = string_constants(module.tree)
    found = set()
    for node, parent in walked:
        if id(node) in skip:
            continue
        if isinstance(node, ast.Attribute) and node.attr in sections and is_config_object(node.value):
            key = parent.attr if isinstance(parent, ast.Attribute) and parent.value is node else None
            found.add(f"{node.attr}.{key}" if key in sections[node.attr] else node.attr)
        elif (isinstance(node, ast.Call) and _called_name(node) == "dump" and node.args
              and is_config_object(node.args[0]) and isinstance(parent, ast.Subscript) and parent.value is node):
            found |= dumped_sections(parent.slice, constants, sections)
    return found


def dumped_sections(index: ast.expr, constants: dict[str, str], sections: dict[str, set[str]]) -> set[str]:
    if isinstance(index, ast.Constant) and index.value in sections:
        return {index.value}
    if isinstance(index, ast.Name) and constants.get(index.id) in sections:
        return {constants[index.id]}
    return set(sections)  # cannot tell which section: all of them


def collapse_params(read: set[str], params_yaml: dict) -> list[str]:
    """Whole sections absorb their keys; keys params.yaml does not hold become their section."""
    out = set()
    for entry in read:
        section, _, key = entry.partition(".")
        if section not in params_yaml:
            raise SystemExit(f"dvc_deps: the code reads {entry} but params.yaml has no section {section!r}: add it "
                             f"(DVC tracks only what params.yaml holds)")
        present = isinstance(params_yaml[section], dict) and key in params_yaml[section]
        out.add(entry if key and present else section)
    whole = {e for e in out if "." not in e}
    return sorted(e for e in out if e in whole or e.partition(".")[0] not in whole)


# -- stages -------------------------------------------------------------------------------------------------

@dataclass
class StageDeps:
    command: str  # cli.py's cmd_<command>
    deps: list[str]
    params: list[str]


def tdm_command(cmd: str, commands: set[str]) -> str | None:
    """The tdm subcommand a stage's cmd runs (underscored), None if it runs none."""
    tokens = shlex.split(cmd) if isinstance(cmd, str) else []
    for i, token in enumerate(tokens):
        if token in ("tdm", "tdm.cli") or token.endswith(("/tdm", "tdm/cli.py")):
            for later in tokens[i + 1:]:
                if later.replace("-", "_") in commands:
                    return later.replace("-", "_")
    return None


def stage_commands(project: Project, dvc_yaml: dict) -> dict[str, str]:
    """{stage: the tdm subcommand its cmd runs} (stages running none are left out)."""
    cli = project.module(project.name_of(Path(CLI)))
    commands = {name.removeprefix("cmd_") for name in cli_functions(cli.tree) if name.startswith("cmd_")}
    found = {}
    for stage, spec in (dvc_yaml.get("stages") or {}).items():
        command = tdm_command(spec.get("cmd", ""), commands)
        if command is not None:
            found[stage] = command
    return found


def derive(root: Path = ROOT, dvc_yaml: dict | None = None) -> dict[str, StageDeps]:
    """{stage: StageDeps} for every stage of dvc.yaml that runs a tdm command."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    dvc_yaml = dvc_yaml if dvc_yaml is not None else yaml.load(root / "dvc.yaml")
    params_yaml = yaml.load(root / "params.yaml") or {}
    project = Project(root)
    derived = {}
    for stage, command in stage_commands(project, dvc_yaml).items():
        closure = stage_closure(project, command)
        read = set().union(*(facts.params for facts in closure.values()))
        derived[stage] = StageDeps(command, code_deps(project, closure), collapse_params(read, params_yaml))
    return derived


# -- dvc.yaml -----------------------------------------------------------------------------------------------

def is_code_dep(entry) -> bool:
    return isinstance(entry, str) and (entry.rstrip("/") == PACKAGE or entry.startswith(PACKAGE + "/"))


def differences(dvc_yaml: dict, derived: dict[str, StageDeps]) -> list[str]:
    """One line per stage whose dvc.yaml entries differ from the derived ones."""
    problems = []
    for stage, want in derived.items():
        spec = dvc_yaml["stages"][stage]
        for kind, have, should in (
                ("deps", [d for d in spec.get("deps") or [] if is_code_dep(d)], want.deps),
                ("params", [p for p in spec.get("params") or [] if isinstance(p, str)], want.params)):
            missing, extra = sorted(set(should) - set(have)), sorted(set(have) - set(should))
            if missing or extra:
                detail = "; ".join(s for s in (f"missing {', '.join(missing)}" if missing else "",
                                                f"extra {', '.join(extra)}" if extra else "") if s)
                problems.append(f"stage {stage}: {kind}: {detail}")
            elif have != should:
                problems.append(f"stage {stage}: {kind}: not in the derived order (sorted)")
    return problems


def round_trip_yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: keeps comments, key order and quoting
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    return yaml


def rewrite(dvc_yaml, derived: dict[str, StageDeps]) -> None:
    """Replace each stage's code deps and plain params (in place), keeping its other entries first."""
    from ruamel.yaml.comments import CommentedSeq

    for stage, want in derived.items():
        spec = dvc_yaml["stages"][stage]
        deps = [d for d in spec.get("deps") or [] if not is_code_dep(d)] + want.deps
        _set_list(spec, "deps", deps, CommentedSeq, after="cmd")
        params = want.params + [p for p in spec.get("params") or [] if not isinstance(p, str)]
        _set_list(spec, "params", params, CommentedSeq, after="deps")


def _set_list(spec, key: str, values: list, seq_type, after: str) -> None:
    if not values:
        spec.pop(key, None)
        return
    if key in spec:
        spec[key][:] = values
        return
    keys = list(spec)
    position = keys.index(after) + 1 if after in keys else len(keys)
    spec.insert(position, key, seq_type(values))


def explain(root: Path, stage: str) -> int:
    """Print, for each module of the stage, the chain of imports that brings it in."""
    from ruamel.yaml import YAML

    project = Project(root)
    command = stage_commands(project, YAML(typ="safe").load(root / "dvc.yaml")).get(stage)
    if command is None:
        print(f"dvc_deps: no dvc.yaml stage {stage!r} running a tdm command", file=sys.stderr)
        return 2
    via: dict[str, str] = {}
    for name in sorted(stage_closure(project, command, via)):
        chain = [name]
        while chain[-1] in via:  # ends at cli.py (the command) or at "the stage module"
            chain.append(via[chain[-1]])
        print(f"{name}: {' <- '.join(chain[1:]) or 'the command'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml disagrees with the code")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps and params in place")
    mode.add_argument("--why", metavar="STAGE", help="print why each module is in a stage (who imports it)")
    parser.add_argument("--root", type=Path, default=ROOT, help="project root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.why:
        return explain(args.root, args.why)
    path = args.root / "dvc.yaml"
    yaml = round_trip_yaml()
    dvc_yaml = yaml.load(path)
    derived = derive(args.root, dvc_yaml)
    if args.check:
        problems = differences(dvc_yaml, derived)
        for line in problems:
            print(f"dvc.yaml: {line}", file=sys.stderr)
        if problems:
            print("dvc.yaml drifted from the code: run `python scripts/dvc_deps.py --write` (and review the diff)",
                  file=sys.stderr)
        return 1 if problems else 0
    if args.write:
        rewrite(dvc_yaml, derived)
        with path.open("w") as f:
            yaml.dump(dvc_yaml, f)
        return 0
    for stage, want in derived.items():
        print(f"{stage}:  # tdm {want.command.replace('_', '-')}")
        print("  deps:\n" + "".join(f"    - {d}\n" for d in want.deps), end="")
        print("  params:" + ("\n" + "".join(f"    - {p}\n" for p in want.params) if want.params else " []\n"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
