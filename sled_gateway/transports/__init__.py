"""Where people answer permission requests besides the web console and the API.

Each transport listens to the gateway's events for what to show and decides
through the approvals service with its own :class:`~sled_gateway.principal.Principal`:
:mod:`.terminal` (``--interactive``) and :mod:`.matrix` (a Matrix room). A new
channel (a phone app, another chat network) is one more module here.
"""
