"""udnc-fx"""
