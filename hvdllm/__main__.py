import sys

from hvdllm.cli import main

sys.exit(main())
