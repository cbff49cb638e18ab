"""The node proxy: listeners inside pod netns, HBONE tunnels, authorization."""
