"""The part of HTTP/2 that HBONE uses (RFC 9113, RFC 7541), written for the proxy's hot path."""
