"""The front process: the gates and the router in a process of their own, which outlives the
daemon (`main`), the daemon's side of it (`client`), and their control socket (`wire`)."""
