"""Data channels of the transfer layer: one module per channel behind :mod:`.base`'s interface.

* :mod:`.tcp`  - checksummed frames over a plain socket, read straight into pool pages.
* :mod:`.nixl` - NIXL WRITEs with a notification per chunk.
* :mod:`.frames` - the TCP channel's socket and frame helpers.
"""
