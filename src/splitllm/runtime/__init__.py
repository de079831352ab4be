"""The runtime: real split inference between a server and its clients.

units (slicing a model), protocol (wire format), session + server (the server side),
generate + client + transport (the client side), autoplace + profile (`--placement auto`),
hosting (running a server), commands + demo (the CLI).
"""
