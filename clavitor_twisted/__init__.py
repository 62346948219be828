"""
clavitor-repl: replicates Clavitor vault files from a primary POP to its
backup POP over mutually authenticated TLS 1.3.
"""
