"""The command line: a thin layer that parses options and calls one library function per command."""
