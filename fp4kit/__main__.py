import sys

from fp4kit.cli import main

sys.exit(main())
