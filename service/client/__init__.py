"""``streamer-client``: stream a file or stdin to a session and print its events as they arrive."""
