"""The Slicer extension's CMakeLists list every file the module needs.

A file missing from MODULE_PYTHON_SCRIPTS or MODULE_PYTHON_RESOURCES is left out of the
built and installed extension, and Slicer then fails at run time. These tests read the two
CMakeLists with a small parser, and, where cmake is on PATH, also evaluate them with
``cmake -P`` (Slicer's commands stubbed) to prove that CMake reads them the same way.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = "InvarianceExplorer"
MODULE_DIR = ROOT / MODULE_NAME
RESOURCES_DIR = ROOT / "Resources"

#: Files under Resources/ that the module never reads and that are not installed:
#: version-control files (any directory) and the folder's own README (top level only).
#: Everything else under Resources/ must be in MODULE_PYTHON_RESOURCES.
RESOURCES_NOT_INSTALLED_NAMES = {".gitkeep", ".gitignore", ".gitattributes"}
RESOURCES_NOT_INSTALLED_PATHS = {"Resources/README.md"}

#: Where Slicer puts scripted modules, relative to the build and install trees (any value works here).
QT_SCRIPTED_MODULES_DIR = "lib/Slicer-5.8/qt-scripted-modules"

_TOKEN = re.compile(r'#\[(=*)\[.*?\]\1\]|#[^\n]*|"(?:\\.|[^"\\])*"|[()]|[^\s()#"]+', re.S)


def parse_commands(path):
    """Return the commands of a CMake file as ``(lower-case name, [raw arguments])``.

    Tolerant, not complete: comments are dropped, quotes kept on quoted arguments,
    parentheses inside a command's arguments kept as tokens.
    """
    tokens = [m.group(0) for m in _TOKEN.finditer(path.read_text()) if not m.group(0).startswith("#")]
    commands, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and tokens[i + 1] == "(":
            depth, j = 1, i + 2
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            commands.append((tokens[i].lower(), tokens[i + 2 : j - 1]))
            i = j
        else:
            i += 1
    return commands


def evaluate_sets(commands):
    """Evaluate the ``set(VAR ...)`` and ``list(APPEND VAR ...)`` commands, in order, into lists."""
    variables = {}

    def expand(arg):
        quoted = arg.startswith('"')
        value = re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables.get(m.group(1), [])), arg.strip('"'))
        return [value] if quoted else [v for v in value.split(";") if v]

    for name, args in commands:
        if name == "set" and args:
            variables[args[0]] = [v for a in args[1:] for v in expand(a)]
        elif name == "list" and args[:1] == ["APPEND"]:
            variables.setdefault(args[1], []).extend(v for a in args[2:] for v in expand(a))
    return variables


TOP_COMMANDS = parse_commands(ROOT / "CMakeLists.txt")
MODULE_COMMANDS = parse_commands(MODULE_DIR / "CMakeLists.txt")
TOP_VARS = evaluate_sets(TOP_COMMANDS)
MODULE_VARS = evaluate_sets(MODULE_COMMANDS)


def args_of(commands, name):
    """Return the arguments of every call of command ``name``."""
    return [args for n, args in commands if n == name]


def list_problems(listed, on_disk, what):
    """Describe entries missing from a CMake list, listed but absent, or listed twice."""
    problems = []
    missing = sorted(set(on_disk) - set(listed))
    absent = sorted(set(listed) - set(on_disk))
    twice = sorted({f for f in listed if listed.count(f) > 1})
    if missing:
        problems.append(f"not listed in {what} (add one line each): " + ", ".join(missing))
    if absent:
        problems.append(f"listed in {what} but no such file: " + ", ".join(absent))
    if twice:
        problems.append(f"listed twice in {what}: " + ", ".join(twice))
    return problems


def module_python_files():
    """Every .py file under InvarianceExplorer/, relative to it (posix)."""
    return [
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)
    ]


def installed_resource_files():
    """Every file under Resources/ that the module needs, relative to the top level (posix)."""
    files = [p.relative_to(ROOT).as_posix() for p in RESOURCES_DIR.rglob("*") if p.is_file()]
    return [
        f
        for f in files
        if f not in RESOURCES_NOT_INSTALLED_PATHS
        and f.rsplit("/", 1)[-1] not in RESOURCES_NOT_INSTALLED_NAMES
        and "__pycache__" not in f.split("/")
    ]


def test_every_python_file_is_a_module_script():
    scripts = MODULE_VARS.get("MODULE_PYTHON_SCRIPTS", [])
    problems = list_problems(scripts, module_python_files(), "MODULE_PYTHON_SCRIPTS")
    problems += [f"not a .py file name: {s}" for s in scripts if not s.endswith(".py")]
    assert not problems, "InvarianceExplorer/CMakeLists.txt:\n" + "\n".join(problems)


def test_every_resource_file_is_listed():
    resources = MODULE_VARS.get("MODULE_PYTHON_RESOURCES", [])
    problems = list_problems(resources, installed_resource_files(), "MODULE_PYTHON_RESOURCES")
    problems += [f"not under Resources/: {r}" for r in resources if not r.startswith("Resources/")]
    assert not problems, "InvarianceExplorer/CMakeLists.txt:\n" + "\n".join(problems)
    assert f"Resources/Icons/{MODULE_NAME}.png" in resources


def test_module_name_matches_project_and_subdirectory():
    assert MODULE_VARS["MODULE_NAME"] == [MODULE_NAME]
    assert args_of(TOP_COMMANDS, "project") == [[MODULE_NAME]]
    assert args_of(TOP_COMMANDS, "add_subdirectory") == [[MODULE_NAME]]
    assert f"{MODULE_NAME}.py" in MODULE_VARS["MODULE_PYTHON_SCRIPTS"]


def test_extension_metadata_and_slicer_boilerplate():
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert TOP_VARS.get(f"EXTENSION_{var}"), f"EXTENSION_{var} is not set"
    assert "PyTorch" in TOP_VARS["EXTENSION_DEPENDS"]
    assert TOP_VARS["EXTENSION_ICONURL"][0].endswith(f"/Resources/Icons/{MODULE_NAME}.png")
    names = [n for n, _ in TOP_COMMANDS]
    assert names[:2] == ["cmake_minimum_required", "project"]
    assert TOP_COMMANDS[names.index("find_package") : names.index("find_package") + 2] == [
        ("find_package", ["Slicer", "REQUIRED"]),
        ("include", ["${Slicer_USE_FILE}"]),
    ]
    assert names.index("find_package") < names.index("add_subdirectory")
    assert TOP_COMMANDS[-2:] == [
        ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
        ("include", ["${Slicer_EXTENSION_CPACK}"]),
    ]


def test_scripted_module_macro_and_unittest():
    (build,) = args_of(MODULE_COMMANDS, "slicermacrobuildscriptedmodule")
    assert build[build.index("NAME") + 1] == "${MODULE_NAME}"
    assert build[build.index("SCRIPTS") + 1] == "${MODULE_PYTHON_SCRIPTS}"
    assert "WITH_GENERIC_TESTS" in build
    # Top-level Resources/ cannot go through the macro's RESOURCES (see the CMakeLists comment).
    assert "RESOURCES" not in build
    names = [n for n, _ in MODULE_COMMANDS]
    test = names.index("slicer_add_python_unittest")
    assert MODULE_COMMANDS[test][1] == ["SCRIPT", "${MODULE_NAME}.py"]
    if_index = max(i for i, (n, a) in enumerate(MODULE_COMMANDS[:test]) if n == "if")
    assert MODULE_COMMANDS[if_index][1] == ["BUILD_TESTING"]
    assert "endif" not in names[if_index:test]


# cmake -P driver: Slicer's and the non-scriptable commands are stubbed, the extension's
# CMakeLists is included as Slicer would configure it, and the results are printed.
_DRIVER = """
set(EXT_ROOT "@ROOT@")
set(CMAKE_BINARY_DIR "@BUILD@")
set(BUILD_TESTING ON)
file(WRITE "${CMAKE_BINARY_DIR}/empty.cmake" "")
macro(project name)
  set(${name}_SOURCE_DIR "${EXT_ROOT}")
endmacro()
macro(find_package)
  set(Slicer_USE_FILE "${CMAKE_BINARY_DIR}/empty.cmake")
  set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_BINARY_DIR}/empty.cmake")
  set(Slicer_EXTENSION_CPACK "${CMAKE_BINARY_DIR}/empty.cmake")
  set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "@QTSM@")
endmacro()
macro(add_subdirectory dir)
  include("${EXT_ROOT}/${dir}/CMakeLists.txt")
endmacro()
function(slicerMacroBuildScriptedModule)
  message(NOTICE "OUT build=${ARGN}")
endfunction()
function(slicer_add_python_unittest)
  message(NOTICE "OUT unittest=${ARGN}")
endfunction()
function(add_custom_command)
  cmake_parse_arguments(C "" "" "OUTPUT;DEPENDS;COMMAND;COMMENT" ${ARGN})
  message(NOTICE "OUT copy=${C_DEPENDS}>${C_OUTPUT}")
endfunction()
function(add_custom_target name)
  message(NOTICE "OUT target=${name};${ARGN}")
endfunction()
function(install)
  message(NOTICE "OUT install=${ARGN}")
endfunction()
include("${EXT_ROOT}/CMakeLists.txt")
foreach(var MODULE_NAME MODULE_PYTHON_SCRIPTS MODULE_PYTHON_RESOURCES EXTENSION_DEPENDS)
  message(NOTICE "OUT ${var}=${${var}}")
endforeach()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")
def test_cmake_reads_the_lists_and_copies_resources_next_to_the_module(tmp_path):
    build = tmp_path / "build"
    driver = tmp_path / "driver.cmake"
    text = _DRIVER.replace("@ROOT@", ROOT.as_posix()).replace("@BUILD@", build.as_posix())
    driver.write_text(text.replace("@QTSM@", QT_SCRIPTED_MODULES_DIR))
    run = subprocess.run(["cmake", "-P", str(driver)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = {}
    for line in run.stderr.splitlines():
        if line.startswith("OUT "):
            key, _, value = line[4:].partition("=")
            out.setdefault(key, []).append(value.split(";") if value else [])

    # CMake reads the lists as the parser above does.
    for var, values in (("MODULE_NAME", MODULE_VARS), ("EXTENSION_DEPENDS", TOP_VARS)):
        assert out[var] == [values[var]], var
    scripts, resources = out["MODULE_PYTHON_SCRIPTS"][0], out["MODULE_PYTHON_RESOURCES"][0]
    assert scripts == MODULE_VARS["MODULE_PYTHON_SCRIPTS"]
    assert resources == MODULE_VARS["MODULE_PYTHON_RESOURCES"]
    assert out["build"][0][:2] == ["NAME", MODULE_NAME] and out["build"][0][2] == "SCRIPTS"
    assert out["build"][0][3:] == scripts + ["WITH_GENERIC_TESTS"]
    assert out["unittest"] == [["SCRIPT", f"{MODULE_NAME}.py"]]

    # Each top-level resource is copied to <qt-scripted-modules>/Resources/..., next to
    # InvarianceExplorer.py, where the macro's install(DIRECTORY) picks it up.
    destination = f"{build.as_posix()}/{QT_SCRIPTED_MODULES_DIR}"
    expected = [f"{ROOT.as_posix()}/{r}>{destination}/{r}" for r in resources]
    assert [c[0] for c in out["copy"]] == expected
    (target,) = out["target"]
    assert target[1] == "ALL" and target[target.index("DEPENDS") + 1 :] == [f"{destination}/{r}" for r in resources]
    assert "install" not in out
