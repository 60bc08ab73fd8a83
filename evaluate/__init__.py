"""iosd.evaluate"""
