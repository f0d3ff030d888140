import sys

from kmedtl.study.cli import main

sys.exit(main())
