"""The explorer web app and `trace`: proponents of stored and new queries, read from the lake."""
