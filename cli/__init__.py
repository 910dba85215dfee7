"""The `asyncvid` command line: a thin layer that builds settings and calls the library."""
