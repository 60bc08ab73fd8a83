"""iosd.train"""
