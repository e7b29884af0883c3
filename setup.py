from setuptools import find_packages, setup

setup(
    name="geotaxi",
    version="1.0.0",
    description="UDP ingest server of taxi positions into Redis, for the open taxi API",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"geotaxi": ["*.json", "*.lua"]},
    # Tested with the lower bound of each range and with the newest release
    # at the time of writing (Twisted 26.10, txredisapi 1.6.0, treq 26.7).
    install_requires=[
        "Twisted[conch]>=23.10,<27",
        "txredisapi>=1.4.10,<1.7",
        "treq>=23.11,<27",
        "jsonschema>=4.18,<5",
        "fastjsonschema>=2.19,<3",
        "fluent-logger>=0.10,<0.12",
        "msgpack>=1.0,<2",
        "orjson>=3.9,<4",
    ],
    extras_require={
        "test": ["pytest>=7,<10"],
        "sentry": ["sentry-sdk>=1.40,<3"],
    },
    entry_points={
        "console_scripts": [
            "geotaxi = geotaxi.cli:main",
            "geotaxi-traffic = geotaxi.traffic:main",
            "geotaxi-netstat = geotaxi.netstat:main",
        ],
    },
)
