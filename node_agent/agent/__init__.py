"""`weir agent`: the DaemonSet process that ties enrollment, capture and the proxy together."""
