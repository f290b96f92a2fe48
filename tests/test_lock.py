"""requirements/lock-cpu.txt: the environment the documented figures were measured in, within pyproject's ranges."""

import tomllib
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def locked() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_dependency_at_a_version_pyproject_allows():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/lock-cpu.txt: run requirements/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(pins[name]), spec)
    assert pins["torch"].base_version == "2.13.0"  # the CPU build the README installs first
