"""The aiohttp layer: a thin shell over the plain-Python domain modules."""
