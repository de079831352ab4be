"""The runtime: real split inference between a server and its clients.

units (slicing a model), protocol (wire format), session + server (the server side),
client + remote + link_probe + textstream + transport + decoding (the client side),
autoplace + profile + wire_bytes (`placement="auto"`), hosting (running a server),
commands + demo (the CLI).
"""
