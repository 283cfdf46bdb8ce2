import sys

from clpoison.cli import main

sys.exit(main())
