"""The gateway's HTTP side: routes (:mod:`.routes`), the request guard (:mod:`.guard`),
query and body parsing (:mod:`.params`) and the web console page (:mod:`.console`)."""
