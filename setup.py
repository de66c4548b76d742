"""Maps the root folders onto one import namespace: engine/ -> ndtrain.engine, data/ -> ndtrain.data, ...

Everything else lives in pyproject.toml; only the package list is computed here, so that a new sub-package under a
root folder is picked up by both `pip install .` and `pip install -e .` without editing a list.
"""
from setuptools import find_packages, setup

ROOTS = ("engine", "data", "cluster", "launch")

# ndtrain/ itself: the top package (the Python API, __version__, `python -m ndtrain`)
packages, package_dir = ["ndtrain"], {"ndtrain": "ndtrain"}
for root in ROOTS:
    packages.append(f"ndtrain.{root}")
    package_dir[f"ndtrain.{root}"] = root
    for sub in find_packages(root):
        packages.append(f"ndtrain.{root}.{sub}")

# The TOML presets in configs/ ship as data: installed as ndtrain/configs/*.toml, beside ndtrain/launch, where the
# trainer looks for them (in an editable install that is the repo's own configs/).
packages.append("ndtrain.configs")
package_dir["ndtrain.configs"] = "configs"

setup(packages=packages, package_dir=package_dir, package_data={"ndtrain.configs": ["*.toml"]})
