import sys

from trimtab.plugin.cli import main

sys.exit(main())
