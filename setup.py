from setuptools import setup

setup(
    name="flexvdi-gateway",
    version="1.0.0",
    description="Gateway between flexVDI clients and the flexVDI Manager and desktops",
    py_modules=["flexvdi_gateway"],
    python_requires=">=3.9",
    install_requires=["ldap3>=2.8", "simple-websocket>=1.0", "wsproto>=1.0"],
    extras_require={
        "test": ["pytest", "hypothesis", "simple-websocket", "wsproto", "websockets"],
    },
    entry_points={"console_scripts": ["flexvdi-gateway = flexvdi_gateway:main"]},
)
