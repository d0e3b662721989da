"""Print the requirements of the named parts of pyproject.toml, one a line, for an image build.

`gateway` is the project's own dependencies, any other name an optional extra (`worker`). The
versions come from requirements.lock, which the build passes to pip as a constraint file.
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
for part in sys.argv[1:]:
    names = project["dependencies"] if part == "gateway" else project["optional-dependencies"][part]
    print("\n".join(names))
