"""`python -m cni_plugin`, and the script PyInstaller freezes into the weir-cni binary."""

import sys

from cni_plugin.main import main

sys.exit(main())
