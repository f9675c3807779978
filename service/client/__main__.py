"""``python -m service.client``: the same as ``streamer-client``."""

from service.client.cli import main

main()
