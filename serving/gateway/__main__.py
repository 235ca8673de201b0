"""`python -m serving.gateway` = `medpipe gateway`."""

from medpipe.cli import module_main
from serving.gateway.server import main

module_main(main)
