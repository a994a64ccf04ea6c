"""`python -m ndif_jobs`. Python puts the folder the command runs in first on the import path for
`-m`; it is taken off again so that, as with the installed `ndif-jobs` command, a file that happens
to lie there (in a cloned repository, say) cannot stand in for a module ndif-jobs or an experiment
imports. ndif_jobs itself is already imported, so running from a checkout still works."""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from .cli import main  # noqa: E402

main()
